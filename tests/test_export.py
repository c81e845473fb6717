"""Exports: a variant's adapter zip (with its lineage README) and its merged
model, which must answer exactly as the adapter does."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from django.urls import reverse

from engines.inference import GenerationSettings, generate, load_model
from evals import actions as eval_actions
from evals.models import ArmComparison, EvalRun
from tests.conftest import build_random_lora
from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, Variant

pytestmark = pytest.mark.django_db

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "How do I reset my password?",
    "Grüße! 你好 — how are you?",
    "Tell me a joke about trains.",
]


def random_lora(base_dir: Path, out: Path, seed: int = 3) -> Path:
    """A PEFT LoRA with random A and B (a fresh one has B = 0 and changes nothing)."""
    return build_random_lora(base_dir, out, seed, r=8, alpha=16, std=0.3)


@pytest.fixture
def variant(alice, alice_project, lively_dir, tmp_path) -> Variant:
    base = FoundationModel.objects.create(name="lively-base", path=str(lively_dir), source="tests")
    prompt = save_prompt(
        alice_project, alice, "support", "You are Acme's assistant. Start with 'Hello'.", []
    ).version
    rows = "\n".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"Hello, answer {i}."},
                ]
            }
        )
        for i in range(12)
    )
    data = import_dataset(
        alice_project, alice, "faq", io.BytesIO(rows.encode()), filename="faq.jsonl", eval_percent=25
    )
    variant = Variant.objects.create(
        project=alice_project,
        name="acme-student",
        base_model=base,
        adapter_path=str(random_lora(lively_dir, tmp_path / "adapter")),
        prompt_version=prompt,
        prompt_sha256=prompt.sha256,
        dataset_version=data,
        final_loss=0.5678,
        hyperparameters={
            "rank": 8,
            "alpha": 16,
            "learning_rate": 0.0003,
            "target_modules": ["q_proj", "v_proj"],
        },
    )
    suite = eval_actions.create_suite(alice_project, alice, "held out", data, prompt_version=prompt)
    comparison = ArmComparison.objects.create(
        project=alice_project,
        suite=suite,
        variant=variant,
        headline={
            "metric": "all_rules",
            "retained": {"value": 0.81, "low": 0.62, "high": 0.97, "n": 3},
            "absolute": {"floor": 0.1, "teacher": 0.9, "student": 0.75},
            "tokens_saved_per_1000": 41000,
        },
    )
    EvalRun.objects.create(
        project=alice_project,
        suite=suite,
        base_model=base,
        variant=variant,
        arm="student",
        comparison=comparison,
        summary={
            "complete": True,
            "metrics": {"all_rules": {"value": 0.75, "low": 0.5, "high": 0.9, "n": 3}},
        },
    )
    return variant


def download(client, name: str, v: Variant):
    return client.get(reverse(name, args=[v.project.slug, v.pk]))


def body(response) -> bytes:
    try:
        return b"".join(response.streaming_content)
    finally:
        response.close()


def test_the_adapter_zip_holds_the_adapter_and_a_lineage_readme(variant, alice_client):
    response = download(alice_client, "variant_export_adapter", variant)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert (
        "attachment" in response["Content-Disposition"] and "adapter.zip" in response["Content-Disposition"]
    )
    zf = zipfile.ZipFile(io.BytesIO(body(response)))
    names = {Path(n).name: n for n in zf.namelist()}
    assert set(names) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert (
        zf.read(names["adapter_model.safetensors"])
        == (Path(variant.adapter_path) / "adapter_model.safetensors").read_bytes()
    )
    assert json.loads(zf.read(names["adapter_config.json"]))["r"] == 8
    readme = zf.read(names["README.md"]).decode()
    for expected in (
        "lively-base",
        str(variant.prompt_version),
        variant.prompt_version.sha256,
        str(variant.dataset_version),
        "0.5678",
        '"learning_rate": 0.0003',
        "Prompt effect retained without the prompt: 0.810 (95% CI 0.620 to 0.970)",
        "41,000",
        "| held out | acme-student",
    ):
        assert expected in readme, expected


def prepare_merged(client, variant: Variant) -> Path:
    """GET merged.zip: 202 and a merge job (one, however often it is asked);
    run the job here, as a worker would; the zip is then in the cache."""
    from jobs import lifecycle
    from jobs.models import Job
    from serving.exports import merged_cache_path

    first = download(client, "variant_export_merged", variant)
    assert first.status_code == 202, first.content[:500]
    answer = first.json()
    assert answer["status"] == "preparing" and first["Retry-After"]
    again = download(client, "variant_export_merged", variant)
    assert again.status_code == 202 and again.json()["job"] == answer["job"]
    [job] = Job.objects.filter(kind="merge")
    assert job.pk == answer["job"] and job.params == {"variant": variant.pk}
    lifecycle.execute(job.pk, "test")
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED, job.log
    path = merged_cache_path(variant)
    assert path.is_file() and not [p for p in path.parent.iterdir() if p != path]  # no temporary left
    return path


def test_the_merged_model_answers_exactly_as_the_adapter(variant, alice_client, tmp_path, one_torch_thread):
    import time

    import torch

    cached = prepare_merged(alice_client, variant)
    made = cached.stat().st_mtime_ns
    began = time.perf_counter()
    response = download(alice_client, "variant_export_merged", variant)
    served_in = time.perf_counter() - began
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert "attachment" in response["Content-Disposition"] and "merged.zip" in response["Content-Disposition"]
    content = body(response)
    assert content == cached.read_bytes()  # the cached file, not a new merge
    assert cached.stat().st_mtime_ns == made and served_in < 2.0  # no model loaded (a merge takes seconds)
    zipfile.ZipFile(io.BytesIO(content)).extractall(tmp_path / "unzipped")
    [merged_dir] = list((tmp_path / "unzipped").iterdir())
    files = {p.name for p in merged_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= files
    assert not any(name.startswith("adapter") for name in files)

    adapter = load_model(variant.base_model.path, variant.adapter_path, dtype=torch.float32, merge=False)
    merged = load_model(merged_dir, dtype=torch.float32)
    assert adapter.has_adapter and not merged.has_adapter
    # The chat template came along and the EOS includes its end-of-turn token.
    assert merged.tokenizer.chat_template == adapter.tokenizer.chat_template
    end_of_turn = merged.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"]
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])
    assert set(merged.stop_token_ids) == set(adapter.stop_token_ids)

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=24, batch_size=len(PROMPTS))
    from_adapter = generate(adapter, conversations, None, settings)
    from_merged = generate(merged, conversations, None, settings)
    assert [c.text for c in from_merged] == [c.text for c in from_adapter]
    assert [c.completion_tokens for c in from_merged] == [c.completion_tokens for c in from_adapter]
    with adapter.adapter_disabled():  # the adapter does change the answers: the equality is not trivial
        from_base = generate(adapter, conversations, None, settings)
    assert [c.text for c in from_base] != [c.text for c in from_adapter]


def test_only_members_download_and_a_base_variant_has_no_adapter(variant, alice_client, bob, bob_project):
    from django.test import Client

    client = Client()  # not alice's: the `client` fixture is the one alice_client logged in
    base_variant = Variant.objects.create(project=variant.project, name="base", base_model=variant.base_model)
    for name in ("variant_export_adapter", "variant_export_merged"):
        response = download(alice_client, name, base_variant)
        assert response.status_code == 404
        assert "has no adapter" in response.content.decode()

        assert download(client, name, variant).status_code == 302  # anonymous: to the login page
        client.force_login(bob)
        assert download(client, name, variant).status_code == 404  # another project's variant
        # ... also when asked for under bob's own project slug
        assert client.get(reverse(name, args=[bob_project.slug, variant.pk])).status_code == 404
        client.logout()


def test_the_variant_page_links_to_both_downloads(variant, alice_client):
    page = alice_client.get(
        reverse("variant_detail", args=[variant.project.slug, variant.pk])
    ).content.decode()
    assert reverse("variant_export_adapter", args=[variant.project.slug, variant.pk]) in page
    assert reverse("variant_export_merged", args=[variant.project.slug, variant.pk]) in page


def safetensors_dtypes(path: Path) -> set[str]:
    import struct

    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def test_a_bf16_base_is_merged_and_exported_in_bf16(
    alice, alice_project, alice_client, tiny_model_dir, tmp_path
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.exports import checkpoint_dtype

    bf16_dir = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(bf16_dir)
    assert safetensors_dtypes(bf16_dir / "model.safetensors") == {"BF16"}
    base = FoundationModel.objects.create(name="tiny-bf16", path=str(bf16_dir))
    variant = Variant.objects.create(
        project=alice_project,
        name="bf16-student",
        base_model=base,
        adapter_path=str(build_random_lora(bf16_dir, tmp_path / "adapter", r=4)),
    )
    cached = prepare_merged(alice_client, variant)
    with zipfile.ZipFile(cached) as zf:
        [weights] = [n for n in zf.namelist() if n.endswith(".safetensors")]
        zf.extract(weights, tmp_path / "out")
        config = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("/config.json"))))
    assert safetensors_dtypes(tmp_path / "out" / weights) == {"BF16"}  # not float32: half the size
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    # A config that does not say: the weights' own dtype decides.
    config_path = bf16_dir / "config.json"
    plain = {
        k: v for k, v in json.loads(config_path.read_text()).items() if k not in ("dtype", "torch_dtype")
    }
    config_path.write_text(json.dumps(plain))
    assert checkpoint_dtype(bf16_dir) == "bfloat16"


def test_a_browser_gets_a_page_that_waits_and_a_failed_merge_is_not_retried_on_reload(variant, alice_client):
    from jobs import lifecycle
    from jobs.models import Job

    url = reverse("variant_export_merged", args=[variant.project.slug, variant.pk])
    page = alice_client.get(url, headers={"Accept": "text/html"})
    assert page.status_code == 202 and "being prepared" in page.content.decode()
    assert '<meta http-equiv="refresh"' in page.content.decode()
    job = Job.objects.get(kind="merge")
    assert (
        f'href="{url}"' in alice_client.get(job.get_absolute_url()).content.decode()
    )  # the job page links back
    (Path(variant.adapter_path) / "adapter_model.safetensors").unlink()  # the adapter vanished meanwhile
    lifecycle.execute(job.pk, "test")
    job.refresh_from_db()
    assert job.status == Job.FAILED and "missing" in job.error
    (Path(variant.adapter_path) / "adapter_model.safetensors").write_bytes(b"")  # back (but broken)
    failed = alice_client.get(url)
    assert failed.status_code == 409 and failed.json()["status"] == "failed"
    assert Job.objects.filter(kind="merge").count() == 1  # a reload of a failure starts nothing
    retried = alice_client.get(url + "?retry=1")
    assert retried.status_code == 202 and Job.objects.filter(kind="merge").count() == 2
