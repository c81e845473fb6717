"""The OpenAI-compatible API, mounted under /v1/ (see serving.gateway)."""

from django.urls import path

from serving import gateway

urlpatterns = [
    path("models", gateway.models, name="v1_models"),
    path("models/<path:model>", gateway.models, name="v1_model"),
    path("chat/completions", gateway.chat_completions, name="v1_chat_completions"),
]
