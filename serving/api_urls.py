"""The OpenAI-compatible API, mounted under /v1/ (see serving.gateway).
Any other path under /v1 is an OpenAI-shaped 404, never Django's HTML page."""

from django.urls import path, re_path

from serving import gateway

urlpatterns = [
    path("models", gateway.models, name="v1_models"),
    path("models/<path:model>", gateway.models, name="v1_model"),
    path("chat/completions", gateway.chat_completions, name="v1_chat_completions"),
    path("completions", gateway.completions, name="v1_completions"),
    re_path(r"^(?P<path>.*)$", gateway.not_found, name="v1_not_found"),
]
