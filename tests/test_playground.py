"""The playground (issue 23): one message to one to four models of a
project, each answer streamed from the real hf engine on the tiny model by
the path /v1 takes, with its token counts, times and rule checks; a turn
saved as a row of the project's playground dataset; and the page itself in
a real browser."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse
from playwright.sync_api import expect

from serving import playground
from serving.engine_client import EngineClient
from tests import test_gateway
from tests.processes import REPO
from tests.test_gateway import PROMPT, QUESTION, count
from tests.test_ui_walk import log_in, watch
from workbench.models import Dataset, DatasetRow, FoundationModel, Prompt, PromptVersion, Variant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# test_gateway's fixtures (its engine, project, key, variants and aliases), used here by name.
adapter_dir = test_gateway.adapter_dir
engine = test_gateway.engine
served = test_gateway.served
tokenizer = test_gateway.tokenizer
world = test_gateway.world

MESSAGE = QUESTION[0]["content"]
GREEDY = {"temperature": 0, "max_tokens": 12}
SCREENSHOT = REPO / "test-artifacts" / "screenshots" / "playground.png"


def ask(client, slug, models, column=0, message=MESSAGE, **fields):
    data = {"message": message, "model": models, "column": column, "temperature": 0, "max_tokens": 12}
    return client.post(reverse("playground_stream", args=[slug]), {**data, **fields})


def events(response) -> list[tuple[str, dict]]:
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/event-stream")
    out = []
    for block in b"".join(response.streaming_content).decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def answer(client, slug, models, column=0, **fields) -> dict:
    """The `done` event of a column, checked against the pieces streamed before it."""
    got = events(ask(client, slug, models, column, **fields))
    names = [name for name, _ in got]
    assert names[-1] == "done" and set(names[:-1]) == {"delta"}, got
    done = got[-1][1]
    assert "".join(data["text"] for _, data in got[:-1]) == done["text"]
    return done


def v1(client, world, model):
    response = client.post(
        "/v1/chat/completions",
        json.dumps({"model": model, "messages": QUESTION, **GREEDY}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {world.raw}",
    )
    assert response.status_code == 200, response.content
    return response.json()


def test_it_streams_what_v1_answers_for_the_same_model(alice_client, world, served):
    models = ["alias:production", "alias:staging", f"variant:{world.student.pk}"]
    for column, name in enumerate(["production", "staging", f"variant-{world.student.pk}"]):
        got = events(ask(alice_client, world.slug, models, column))
        deltas = [d["text"] for n, d in got if n == "delta"]
        assert len(deltas) > 1  # streamed piece by piece, not in one
        done = got[-1][1]
        client = v1(Client(), world, f"{world.slug}/{name}")
        assert "".join(deltas) == done["text"] == client["choices"][0]["message"]["content"]
        assert done["prompt_tokens"] == client["usage"]["prompt_tokens"]
        assert done["completion_tokens"] == client["usage"]["completion_tokens"]
        assert 0 < done["ttft_ms"] <= done["total_ms"]
    # the adapter is really used: the plain base answers otherwise
    plain = answer(alice_client, world.slug, ["alias:plain", "alias:production"], 0)
    student = answer(alice_client, world.slug, ["alias:plain", "alias:production"], 1)
    assert plain["text"] != student["text"]


def test_a_base_model_with_a_prompt_version_gets_it_prepended_without_a_new_variant(
    alice_client, world, served, tokenizer
):
    version = world.prompted.prompt_version
    variants = Variant.objects.count()
    models = [f"base:{world.base.pk}", f"base:{world.base.pk}:prompt:{version.pk}"]
    bare = answer(alice_client, world.slug, models, 0)
    teacher = answer(alice_client, world.slug, models, 1)
    assert bare["prompt_tokens"] == count(tokenizer, QUESTION)
    assert teacher["prompt_tokens"] == count(tokenizer, QUESTION, PROMPT) != bare["prompt_tokens"]
    # the same answer a client gets from the saved base + prompt variant
    staging = v1(Client(), world, f"{world.slug}/staging")
    assert teacher["text"] == staging["choices"][0]["message"]["content"] != bare["text"]
    assert Variant.objects.count() == variants


def test_each_rule_passes_or_fails_as_the_answer_does(alice_client, world, served):
    text = answer(alice_client, world.slug, ["alias:production"])["text"]
    assert len(text.strip()) > 3
    version = world.student.prompt_version
    version.rules = [
        {"name": "has its words", "kind": "contains", "text": text.strip()[:4]},
        {"name": "short", "kind": "max_words", "n": 500},
        {"name": "signs off", "kind": "ends_with", "text": "Cheers, Ada"},
    ]
    version.save(update_fields=["rules"])
    # by default, the rules of the prompt version the variant absorbed
    done = answer(alice_client, world.slug, ["alias:production"])
    assert done["text"] == text and done["rules_of"] == str(version)
    assert [(r["name"], r["passed"]) for r in done["rules"]] == [
        ("has its words", True),
        ("short", True),
        ("signs off", False),
    ]
    assert done["all_rules"] is False
    # or of the prompt version picked for checking
    passing = PromptVersion.objects.create(
        prompt=Prompt.objects.create(project=world.student.project, name="lenient"),
        number=1,
        text="Say anything.",
        sha256="y",
        rules=[{"name": "short", "kind": "max_words", "n": 500}],
    )
    done = answer(alice_client, world.slug, ["alias:production"], rules=passing.pk)
    assert done["rules_of"] == "lenient@1" and done["all_rules"] is True
    assert [(r["name"], r["passed"]) for r in done["rules"]] == [("short", True)]
    # a plain base model has no prompt: no rules unless some are picked
    assert answer(alice_client, world.slug, ["alias:plain"])["rules"] == []


def test_another_projects_model_or_page_is_a_404(alice_client, world, bob_project):
    bob_prompt = Prompt.objects.create(project=bob_project, name="bob's")
    bob_version = PromptVersion.objects.create(prompt=bob_prompt, number=1, text="Bob.", sha256="z")
    for spec in (
        f"variant:{world.bob_variant.pk}",
        f"base:{world.base.pk}:prompt:{bob_version.pk}",
        "alias:nonexistent",
        "variant:999999",
    ):
        response = ask(alice_client, world.slug, ["alias:production", spec], 0)
        assert response.status_code == 404, spec
        assert "no model" in response.json()["error"]
    assert ask(alice_client, world.bob_slug, ["alias:production"]).status_code == 404
    assert alice_client.get(reverse("playground", args=[world.bob_slug])).status_code == 404


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"model": ["alias:production"] * 5}, "Pick 1 to 4 models, not 5"),
        ({"model": []}, "model: This field is required"),
        ({"message": "x" * (playground.MAX_MESSAGE_CHARS + 1)}, "message: Ensure this value has at most"),
        ({"message": "   "}, "Type a message"),
        ({"max_tokens": 2049}, "max_tokens: Ensure this value is less than or equal to 2048"),
        ({"max_tokens": 0}, "max_tokens: Ensure this value is greater than or equal to 1"),
        ({"temperature": 2.5}, "temperature: Ensure this value is less than or equal to 2"),
        ({"temperature": "nan"}, "temperature: Enter a number"),
        ({"column": 1}, "column: Column 1 is not one of the 1 model(s) picked"),
        ({"model": ["production"]}, "model: 'production' is not a model"),
        ({"model": ["variant:12x"]}, "model: '12x' is not an id"),
        ({"rules": 999999}, "rules: Select a valid choice"),
    ],
)
def test_bad_input_is_a_400_that_says_what(alice_client, world, settings, fields, says):
    settings.GATEWAY_MAX_TOKENS = 2048
    data = {
        "message": MESSAGE,
        "model": ["alias:production"],
        "column": 0,
        "temperature": 0,
        "max_tokens": 12,
    }
    response = alice_client.post(reverse("playground_stream", args=[world.slug]), {**data, **fields})
    assert response.status_code == 400
    assert says in response.json()["error"]


def test_the_stream_is_a_members_csrf_protected_post(client, world, alice, bob):
    url = reverse("playground_stream", args=[world.slug])
    assert client.post(url, {"message": "hi"}).status_code == 302  # to the login page
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    assert strict.post(url, {"message": "hi", "model": "alias:production"}).status_code == 403
    client.force_login(alice)
    assert client.get(url).status_code == 405
    client.force_login(bob)
    assert client.get(reverse("playground", args=[world.slug])).status_code == 404


def test_a_user_holds_at_most_the_share_of_the_engine_a_key_does(alice_client, world, served, settings):
    settings.V1_MAX_CONCURRENT_PER_KEY = 1
    open_ = ask(alice_client, world.slug, ["alias:production"])
    assert open_.status_code == 200
    refused = ask(alice_client, world.slug, ["alias:production"])
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    assert "at most 1 at a time" in refused.json()["error"]
    open_.close()  # the first answer's stream ends: its share is given back
    assert answer(alice_client, world.slug, ["alias:production"])["text"]


@pytest.mark.parametrize("processes", [1, 2])
def test_columns_asked_together_wait_for_one_load_of_their_base(served, lively_dir, monkeypatch, processes):
    """The page asks all its columns at once: on a fresh engine, a request
    finding its base being loaded (by this process or another) waits for it."""
    from engines.serving_engine import registry

    real, loading = registry.load_model, threading.Event()

    def slow_load(*args, **kwargs):
        loading.set()
        time.sleep(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "load_model", slow_load)
    base = FoundationModel(name=f"tiny-lively-fresh-{processes}", path=str(lively_dir))
    variant = Variant(name="fresh", base_model=base)
    clients = [EngineClient(served.url, timeout=60) for _ in range(processes)]
    failures: list[Exception] = []

    def first() -> None:
        try:
            clients[0].ensure_loaded(variant)
        except Exception as exc:
            failures.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    assert loading.wait(30)
    clients[-1].ensure_loaded(variant)
    thread.join(60)
    assert failures == []
    assert base.name in {m["id"] for m in clients[-1].models()}


def test_a_saved_turn_is_a_row_of_exactly_the_message_and_the_answer(alice_client, world, served, bob):
    url = reverse("playground_save", args=[world.slug])
    first = answer(alice_client, world.slug, ["alias:production", "alias:staging"], 0)
    second = answer(alice_client, world.slug, ["alias:production", "alias:staging"], 1)
    assert first["text"] != second["text"]

    saved = alice_client.post(url, {"turn": first["turn"], "split": "train"})
    assert saved.status_code == 201, saved.content
    dataset = Dataset.objects.get(project__slug=world.slug, name="playground")
    v1 = dataset.latest
    assert saved.json()["message"] == "Saved as row 0 of playground@1, in its train split."
    assert list(v1.rows.values_list("messages", "split")) == [
        ([{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": first["text"]}], "train")
    ]
    assert v1.meta["playground"]["model"] == f"production · {world.student.name}"

    # the same turn again makes nothing; another one is the next version, after the rows before it
    again = alice_client.post(url, {"turn": first["turn"], "split": "train"})
    assert again.status_code == 200 and again.json()["version"] == "playground@1"
    assert alice_client.post(url, {"turn": second["turn"], "split": "eval"}).status_code == 201
    v2 = dataset.latest
    assert v2.number == 2 and v2.parent == v1
    assert list(v2.rows.order_by("index").values_list("messages", "split")) == [
        ([{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": first["text"]}], "train"),
        ([{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": second["text"]}], "eval"),
    ]
    assert v2.eval_count == 1 and v2.eval_percent == 50

    # a saved turn is what the engine said: a forged or foreign token saves nothing
    forged = alice_client.post(url, {"turn": first["turn"][:-2] + "xx", "split": "train"})
    assert forged.status_code == 400 and "not an answer of the playground" in forged.json()["error"]
    bob_client = Client()
    bob_client.force_login(bob)
    assert bob_client.post(url, {"turn": first["turn"], "split": "train"}).status_code == 404
    assert alice_client.post(url, {"turn": first["turn"], "split": "test"}).status_code == 400
    assert dataset.versions.count() == 2 and DatasetRow.objects.filter(version__dataset=dataset).count() == 3


def test_the_page_streams_two_answers_side_by_side_and_saves_one(page, world, served):
    version = world.student.prompt_version
    version.rules = [
        {"name": "short", "kind": "max_words", "n": 500},
        {"name": "signs off", "kind": "ends_with", "text": "Cheers, Ada"},
    ]
    version.save(update_fields=["rules"])
    problems = watch(page)
    log_in(page)
    page.goto(reverse("serving_home", args=[world.slug]))
    page.locator("main").get_by_role("link", name="Playground").click()
    expect(page.get_by_role("heading", name="Playground")).to_be_visible()

    picks = page.locator(".pg-pick")
    picks.nth(0).locator(".pg-model").select_option("alias:production")
    picks.nth(1).locator(".pg-model").select_option(f"base:{world.base.pk}")
    picks.nth(1).locator(".pg-prompt").select_option(str(version.pk))
    for i in (2, 3):
        picks.nth(i).locator(".pg-model").select_option("")
    page.get_by_label("Message").fill(MESSAGE)
    page.get_by_label("Max tokens").fill("12")
    page.get_by_role("button", name="Send").click()

    columns = page.locator(".pg-answer")
    expect(columns).to_have_count(2)
    for i, label in enumerate([f"production · {world.student.name}", f"{world.base.name} + {version}"]):
        column = columns.nth(i)
        expect(column.locator(".pg-label")).to_have_text(label)
        expect(column.locator(".pg-status")).to_have_text("fails a rule", timeout=60_000)
        expect(column.locator(".pg-stats")).to_contain_text("completion tokens")
        expect(column.locator(".pg-stats")).to_contain_text("first token")
        expect(column.locator(".pg-rule.ok")).to_have_text("✓ short")
        expect(column.locator(".pg-rule.bad")).to_have_text("✗ signs off")
    texts = [columns.nth(i).locator(".pg-text").text_content() for i in (0, 1)]
    assert all(texts) and texts[0] != texts[1]

    columns.nth(0).get_by_role("button", name="Save as dataset row").click()
    expect(columns.nth(0).locator(".pg-saved")).to_contain_text("Saved as row 0 of playground@1")
    row = Dataset.objects.get(project__slug=world.slug, name="playground").latest.rows.get()
    assert row.messages == [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": texts[0]}]

    Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert problems == []
