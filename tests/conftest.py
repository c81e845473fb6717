import os
from pathlib import Path

import pytest

from tests.settings import XDIST_INDEX  # the pytest-xdist process's number (0 without xdist)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
# Under pytest-xdist each process (and what it starts) gets one torch thread: two processes with a
# thread per core each would oversubscribe the cores, which stalls torch (STACK-NOTES).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Converted once and reused across runs (gitignored): the real SmolLM2 model.
MODEL_CACHE = Path(os.environ.get("WORKBENCH_TEST_MODEL_CACHE", REPO / ".cache" / "models"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as safetensors (provisioned once)."""
    from filelock import FileLock

    from engines.provisioning import DEFAULT_MODEL_NAME, provision_default

    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(MODEL_CACHE / f"{DEFAULT_MODEL_NAME}.lock"):  # one test process converts, the others wait
        return provision_default(MODEL_CACHE / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="session")
def vllm_python_built() -> Path:
    """The python of .venv-vllm, built by `make vllm-venv` when missing (CI builds
    it here: ~1.5 min from local wheels, 2.5 GB), by one test process at a time."""
    import subprocess

    from filelock import FileLock

    from engines.vllm_server import vllm_python

    if os.environ.get("WORKBENCH_SKIP_VLLM") == "1":
        pytest.skip("WORKBENCH_SKIP_VLLM=1")
    python = vllm_python()
    with FileLock(REPO / ".venv-vllm.lock"):
        if not python.exists():
            result = subprocess.run(
                ["make", "vllm-venv"], cwd=REPO, capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, (
                f"make vllm-venv failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
    assert python.exists()
    return python


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template."""
    return build_tiny_llama(smollm2_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's ops are too small to split across threads, and on a
    busy machine the thread barriers cost more than the work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lively_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model with larger weights: default-initialised it
    answers every prompt with the same token, which would make every
    comparison of outputs pass trivially."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lively")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


def build_random_lora(
    base_dir: Path, out: Path, seed: int = 0, r: int = 4, alpha: int = 8, std: float = 0.5
) -> Path:
    """A LoRA adapter (q_proj, v_proj) with random B as well as A: a fresh
    one has B = 0 and would change nothing. Saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    peft_model.save_pretrained(str(out))
    assert (Path(out) / "adapter_model.safetensors").is_file()
    return Path(out)


def build_tiny_llama(tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A 3M-parameter random Llama with a real tokenizer, for fast tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


# --- personas, projects -------------------------------------------------------


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-password")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-password")


@pytest.fixture
def alice_project(alice):
    from workbench.actions.projects import create_project

    return create_project(alice, "Alpha", "Alice's team")


@pytest.fixture
def bob_project(bob):
    from workbench.actions.projects import create_project

    return create_project(bob, "Bravo", "Bob's team")


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


# --- real processes -----------------------------------------------------------


def database_url() -> str:
    """URL of the database the tests use, for child processes (worker, web)."""
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "") + "@" if s["USER"] else ""
    return f"postgres://{auth}{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


# Each test process its own database: the tests flush it.
REDIS_URL = os.environ.get("TEST_REDIS_URL", f"redis://127.0.0.1:6379/{15 - XDIST_INDEX}")


def redis_or_skip() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).flushdb()
    except redis.ConnectionError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Redis is not running at {REDIS_URL} (CI starts it)")
    return REDIS_URL


# --- the whole path on real processes (browser walk, demo) --------------------

# The four-arm eval answers short and skips lm-eval: the path, not the numbers, is under test.
PATH_WORKER_ENV = {
    "JOB_HEARTBEAT_SECONDS": "1",
    "JOB_PROGRESS_SECONDS": "0.5",
    "OMP_NUM_THREADS": "1",
    "WORKBENCH_EVAL_MAX_NEW_TOKENS": "8",
    "WORKBENCH_EVAL_LM_EVAL_TASKS": "",
}


@pytest.fixture
def tiny_base(lively_dir):
    from workbench.models import FoundationModel

    return FoundationModel.objects.create(name="tiny-lively", path=str(lively_dir), is_default=True)


@pytest.fixture
def worker(tiny_base, tmp_path):
    """A real Celery worker process on the test database."""
    from django.conf import settings

    from tests.processes import celery_worker

    with celery_worker(settings.CELERY_BROKER_URL, database_url(), tmp_path, extra_env=PATH_WORKER_ENV) as w:
        yield w


@pytest.fixture
def engine(lively_dir, one_torch_thread, settings):
    """The hf engine the gateway forwards to, holding the base under its registered name."""
    from engines.engine_server import EngineServer

    server = EngineServer(
        {"tiny-lively": str(lively_dir)}, host="127.0.0.1", port=0, threads=1, dtype="float32"
    )
    server.start()
    settings.ENGINE_URL = server.url
    yield server
    server.stop()


# --- browser ------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page(live_server, monkeypatch):
    """A Playwright page in Debian's chromium (never a downloaded browser)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            raise RuntimeError("chromium is missing in CI (make browser installs it)")
        pytest.skip("chromium is not installed (make test installs it when run as root)")
    # Playwright's sync API runs an event loop in this thread; the ORM calls
    # the test makes around it are still synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
        pg = ctx.new_page()
        pg.set_default_timeout(15_000)
        yield pg
        browser.close()


def pytest_sessionfinish(session, exitstatus):
    import shutil

    from django.conf import settings

    if settings.DATA_DIR.name.startswith("session-"):
        shutil.rmtree(settings.DATA_DIR, ignore_errors=True)
