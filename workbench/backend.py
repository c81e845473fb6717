"""Which inference backend the workbench uses, read from settings in this one
place: jobs (teacher, evals, judge, lm-eval), the /v1 gateway, `manage.py run`
and `serve_engine` all ask here.

`hf` (default): jobs load models in their own process; /v1 goes to the hf
engine at ENGINE_URL. `vllm`: everything goes to a vLLM server, the team's at
VLLM_URL or else the one the workbench starts at ENGINE_URL.
"""

from __future__ import annotations

from django.conf import settings


def remote() -> bool:
    """Whether jobs generate on a server rather than in their own process."""
    return bool(settings.INFERENCE_BACKEND == "vllm")


def team_vllm() -> bool:
    """The vLLM backend on a server the team runs (the workbench starts none)."""
    return remote() and bool(settings.VLLM_URL)


def engine_url() -> str:
    """The root URL of the engine server: the team's vLLM when given, else the
    one the workbench runs (ENGINE_URL)."""
    return str(settings.VLLM_URL) if team_vllm() else str(settings.ENGINE_URL)


def api_key() -> str | None:
    """VLLM_API_KEY: the key a vLLM server requires, sent as a Bearer token."""
    return settings.VLLM_API_KEY or None
