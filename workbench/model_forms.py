"""The form that registers a model folder on the server as a base model:
where it may be (the data or models directory), and what makes it a
Hugging Face model the workbench can load."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from workbench.models import FoundationModel


def model_roots() -> list[Path]:
    """The folders a base model may be registered from (through the UI): the data
    directory and the models directory, with their links resolved."""
    roots = {Path(settings.DATA_DIR).resolve(), Path(settings.MODELS_DIR).resolve()}
    # The models directory is usually inside the data directory: name only the outer one.
    return sorted(r for r in roots if not any(r != o and r.is_relative_to(o) for o in roots))


# What clients and the engine call a base model by.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


class ModelDirectoryForm(forms.Form):
    """A Hugging Face model folder on the server, registered as a base model."""

    path = forms.CharField(
        max_length=1000,
        error_messages={"required": "Give the folder of the model on the server."},
        help_text="The full path of a folder with config.json, *.safetensors weights and a tokenizer.",
    )
    name = forms.CharField(max_length=200, required=False, help_text="Empty: the folder's name.")
    default = forms.BooleanField(required=False, label="Make it the default base model")

    def clean_path(self) -> Path:
        raw = self.cleaned_data["path"].strip()
        if "\x00" in raw:
            raise ValidationError("The path holds a NUL character.")
        given = Path(raw)
        if not given.is_absolute():
            raise ValidationError(f"“{raw}” is not a full path: give one that starts with /.")
        path = given.resolve()  # links resolved: a link cannot lead out of the allowed folders
        roots = model_roots()
        if not any(path == r or path.is_relative_to(r) for r in roots):
            allowed = " or ".join(str(r) for r in roots)
            raise ValidationError(
                f"{path} is outside the folders models are registered from ({allowed}). "
                "Copy or move the model folder under one of them."
            )
        if not path.exists():
            raise ValidationError(f"There is no folder {path} on the server.")
        if not path.is_dir():
            raise ValidationError(f"{path} is a file, not a model folder.")
        config = path / "config.json"
        if not config.is_file():
            raise ValidationError(f"{path} has no config.json: it is not a Hugging Face model folder.")
        try:
            if config.stat().st_size > 1_000_000:
                raise ValueError("larger than 1 MB")
            spec = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ValidationError(f"{config} is not a readable JSON file ({exc}).") from exc
        if not isinstance(spec, dict) or not spec.get("model_type"):
            raise ValidationError(f"{config} names no model_type: it is not a model's configuration.")
        if spec.get("auto_map"):
            raise ValidationError(
                f"{config} needs the model's own Python code (auto_map), which the workbench never runs."
            )
        if not any(path.glob("*.safetensors")):
            pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
            raise ValidationError(
                f"{path} has no *.safetensors weights"
                + (
                    ": only pickled .bin/.pt weights, which are never loaded. Convert them to safetensors."
                    if pickled
                    else "."
                )
            )
        if not (path / "tokenizer_config.json").is_file() or not any(
            (path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
        ):
            raise ValidationError(
                f"{path} has no complete tokenizer: it needs tokenizer_config.json and "
                "tokenizer.json (or tokenizer.model, or vocab.json)."
            )
        return path

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data
        path = data.get("path")
        if isinstance(path, Path):
            name = (data.get("name") or "").strip() or path.name
            data["name"] = name
            if not MODEL_NAME.fullmatch(name):
                self.add_error(
                    "name",
                    f"“{name}” cannot name a base model: use letters, digits and . _ - / "
                    "(at most 200, starting with a letter or digit).",
                )
            elif FoundationModel.objects.filter(name=name).exists():
                self.add_error(
                    "name", f"A base model named “{name}” is already registered: choose another name."
                )
            same = FoundationModel.objects.filter(path=str(path)).first()
            if same is not None:
                self.add_error("path", f"{path} is already registered as “{same.name}”.")
        return data
