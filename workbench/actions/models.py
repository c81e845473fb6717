"""Base models and the workers that run tasks."""

from __future__ import annotations

from pathlib import Path

from django.db import transaction

from engines.provisioning import is_model_dir
from workbench.actions import ActionError
from workbench.models import FoundationModel, WorkerPing
from workbench.tasks import answer_ping

QUEUES = ("default", "gpu")


@transaction.atomic
def send_ping(queue: str = "default") -> WorkerPing:
    """A test task through the broker to a worker on `queue`."""
    if queue not in QUEUES:
        raise ActionError(f"Unknown queue '{queue}'.")
    ping = WorkerPing.objects.create(queue=queue)
    answer_ping.delay_on_commit(ping.pk, queue=queue)
    return ping


def count_parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors headers, without loading weights."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for dim in st.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def _parameters(path: Path) -> int:
    try:
        return count_parameters(path)
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise ActionError(f"The weights in {path} cannot be read as safetensors: {exc}") from exc


@transaction.atomic
def register_base_model(name: str, path: Path, source: str, default: bool = False) -> FoundationModel:
    """Register (or update) a local safetensors model directory."""
    path = path.resolve()
    if not is_model_dir(path):
        raise ActionError(
            f"{path} is not a model directory: it needs config.json and *.safetensors weights "
            "(pickled .bin weights are not loaded)."
        )
    if not (path / "tokenizer_config.json").is_file():
        raise ActionError(f"{path} has no tokenizer (tokenizer_config.json).")
    if default:
        FoundationModel.objects.filter(is_default=True).exclude(name=name).update(is_default=False)
    model, _ = FoundationModel.objects.update_or_create(
        name=name,
        defaults={
            "path": str(path),
            "source": source,
            "parameters": _parameters(path),
            "is_default": default or not FoundationModel.objects.exclude(name=name).exists(),
        },
    )
    return model
