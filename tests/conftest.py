import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# Converted once and reused across runs (gitignored): the real SmolLM2 model.
MODEL_CACHE = Path(os.environ.get("WORKBENCH_TEST_MODEL_CACHE", REPO / ".cache" / "models"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as safetensors (provisioned once)."""
    from workbench.provisioning import DEFAULT_MODEL_NAME, provision_default

    return provision_default(MODEL_CACHE / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template."""
    from workbench.provisioning import build_tiny_llama

    return build_tiny_llama(smollm2_dir, tmp_path_factory.mktemp("tiny-llama"))
