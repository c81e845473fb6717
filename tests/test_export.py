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
from workbench.models import BaseModel, Variant

pytestmark = pytest.mark.django_db

PROMPTS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
           "How do I reset my password?", "Grüße! 你好 — how are you?", "Tell me a joke about trains."]


def random_lora(base_dir: Path, out: Path, seed: int = 3) -> Path:
    """A PEFT LoRA with random A and B (a fresh one has B = 0 and changes nothing)."""
    return build_random_lora(base_dir, out, seed, r=8, alpha=16, std=0.3)


@pytest.fixture
def variant(alice, alice_project, lively_dir, tmp_path) -> Variant:
    base = BaseModel.objects.create(name="lively-base", path=str(lively_dir), source="tests")
    prompt = save_prompt(alice_project, alice, "support", "You are Acme's assistant. Start with 'Hello'.", []).version
    rows = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                              {"role": "assistant", "content": f"Hello, answer {i}."}]})
                     for i in range(12))
    data = import_dataset(alice_project, alice, "faq", io.BytesIO(rows.encode()), filename="faq.jsonl",
                          eval_percent=25)
    variant = Variant.objects.create(
        project=alice_project, name="acme-student", base_model=base,
        adapter_path=str(random_lora(lively_dir, tmp_path / "adapter")), prompt_version=prompt,
        prompt_sha256=prompt.sha256, dataset_version=data, final_loss=0.5678,
        hyperparameters={"rank": 8, "alpha": 16, "learning_rate": 0.0003, "target_modules": ["q_proj", "v_proj"]})
    suite = eval_actions.create_suite(alice_project, alice, "held out", data, prompt_version=prompt)
    comparison = ArmComparison.objects.create(
        project=alice_project, suite=suite, variant=variant,
        headline={"metric": "all_rules", "retained": {"value": 0.81, "low": 0.62, "high": 0.97, "n": 3},
                  "absolute": {"floor": 0.1, "teacher": 0.9, "student": 0.75}, "tokens_saved_per_1000": 41000})
    EvalRun.objects.create(project=alice_project, suite=suite, base_model=base, variant=variant, arm="student",
                           comparison=comparison,
                           summary={"complete": True, "metrics": {"all_rules": {"value": 0.75, "low": 0.5,
                                                                                  "high": 0.9, "n": 3}}})
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
    assert "attachment" in response["Content-Disposition"] and "adapter.zip" in response["Content-Disposition"]
    zf = zipfile.ZipFile(io.BytesIO(body(response)))
    names = {Path(n).name: n for n in zf.namelist()}
    assert set(names) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert zf.read(names["adapter_model.safetensors"]) == \
        (Path(variant.adapter_path) / "adapter_model.safetensors").read_bytes()
    assert json.loads(zf.read(names["adapter_config.json"]))["r"] == 8
    readme = zf.read(names["README.md"]).decode()
    for expected in ("lively-base", str(variant.prompt_version), variant.prompt_version.sha256,
                     str(variant.dataset_version), "0.5678", '"learning_rate": 0.0003',
                     "Prompt effect retained without the prompt: 0.810 (95% CI 0.620 to 0.970)",
                     "41,000", "| held out | acme-student"):
        assert expected in readme, expected


def test_the_merged_model_answers_exactly_as_the_adapter(variant, alice_client, tmp_path, one_torch_thread):
    import torch

    response = download(alice_client, "variant_export_merged", variant)
    assert response.status_code == 200
    zipfile.ZipFile(io.BytesIO(body(response))).extractall(tmp_path / "unzipped")
    [merged_dir] = list((tmp_path / "unzipped").iterdir())
    files = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= files
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
    page = alice_client.get(reverse("variant_detail", args=[variant.project.slug, variant.pk])).content.decode()
    assert reverse("variant_export_adapter", args=[variant.project.slug, variant.pk]) in page
    assert reverse("variant_export_merged", args=[variant.project.slug, variant.pk]) in page
