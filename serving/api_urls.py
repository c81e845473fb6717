"""The OpenAI-compatible API, mounted under /v1/ (see serving.gateway).
Any other path under /v1 is an OpenAI-shaped 404, never Django's HTML page."""

from django.urls import path, re_path

from serving import fine_tuning, gateway

urlpatterns = [
    path("models", gateway.models, name="v1_models"),
    path("models/<path:model>", gateway.models, name="v1_model"),
    path("chat/completions", gateway.chat_completions, name="v1_chat_completions"),
    path("completions", gateway.completions, name="v1_completions"),
    path("files", fine_tuning.files, name="v1_files"),
    path("files/<str:file_id>", fine_tuning.file_detail, name="v1_file"),
    path("files/<str:file_id>/content", fine_tuning.file_content, name="v1_file_content"),
    path("fine_tuning/jobs", fine_tuning.jobs, name="v1_fine_tuning_jobs"),
    path("fine_tuning/jobs/<str:job_id>", fine_tuning.job_detail, name="v1_fine_tuning_job"),
    path("fine_tuning/jobs/<str:job_id>/cancel", fine_tuning.job_cancel, name="v1_fine_tuning_cancel"),
    path("fine_tuning/jobs/<str:job_id>/events", fine_tuning.job_events, name="v1_fine_tuning_events"),
    path(
        "fine_tuning/jobs/<str:job_id>/checkpoints",
        fine_tuning.job_checkpoints,
        name="v1_fine_tuning_checkpoints",
    ),
    re_path(r"^(?P<path>.*)$", gateway.not_found, name="v1_not_found"),
]
