"""Openings per row: one generate call where each conversation's answer
opens with its own prefilled text (or none), in process, through the
response cache and through a live engine server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from engines.generator import CachingGenerator, LocalGenerator, RemoteGenerator
from engines.inference import (
    MIN_PREFIX_TOKENS,
    Completion,
    GenerationSettings,
    encode,
    generate,
    generate_samples,
    generation,
    load_model,
    per_row_openings,
)
from engines.remote import generate_remote
from engines.response_cache import ResponseCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Long enough that the rows share a prefix worth encoding once (prefix reuse on).
SYSTEM = "\n".join(
    [
        "You are the support assistant of Lumen Cloud Backup.",
        *(f"Rule {i}: answer in at most {i + 2} sentences and mention plan number {i}." for i in range(1, 6)),
    ]
)
CONVS = [
    [{"role": "user", "content": "where is my photo?"}],
    [{"role": "user", "content": "how much is the plan?"}],
    [{"role": "user", "content": "Is my data encrypted when it leaves my laptop?"}],
    [{"role": "user", "content": "hi"}],
]
OPENINGS = ["hi there!", None, "Sure. The short answer is", "ok"]
GREEDY = GenerationSettings(max_new_tokens=6, temperature=0.0, batch_size=4)


@pytest.fixture(scope="module")
def lively(lively_dir: Path):
    import torch

    return load_model(lively_dir, device="cpu", dtype=torch.float32)


def texts(completions: list[Completion]) -> list[tuple[str, int, str]]:
    return [(c.text, c.completion_tokens, c.finish_reason) for c in completions]


def test_each_row_opens_with_its_own_text_and_gets_what_it_gets_alone(lively, monkeypatch):
    prefixes: list[int] = []
    encode_prefix = generation._encode_prefix

    def recording(loaded, prefix):
        prefixes.append(len(prefix))
        return encode_prefix(loaded, prefix)

    monkeypatch.setattr(generation, "_encode_prefix", recording)
    batched = generate(lively, CONVS, SYSTEM, GREEDY, opening=OPENINGS)
    assert len(prefixes) == 1 and prefixes[0] >= MIN_PREFIX_TOKENS  # the shared prefix was reused

    for conv, opening, got in zip(CONVS, OPENINGS, batched, strict=True):
        assert got.text.startswith(opening or "") and len(got.text) > len(opening or "")
        # The opening is in the prompt the model continued, not pasted on afterwards.
        assert got.prompt_tokens == len(encode(lively.tokenizer, conv, SYSTEM, opening))
    alone = [
        generate(lively, [c], SYSTEM, GREEDY, opening=o)[0] for c, o in zip(CONVS, OPENINGS, strict=True)
    ]
    assert texts(batched) == texts(alone)
    # Without prefix reuse, and in batches of two, a row still gets the same answer.
    assert texts(
        generate(lively, CONVS, SYSTEM, replace(GREEDY, batch_size=2), False, opening=OPENINGS)
    ) == texts(alone)
    # The openings really steer: the same rows with one shared opening answer differently.
    shared = generate(lively, CONVS, SYSTEM, GREEDY, opening="hi there!")
    assert [c.text for c in shared] != [c.text for c in batched]
    assert all(c.text.startswith("hi there!") for c in shared)


def test_samples_share_their_conversations_opening(lively):
    convs, openings = CONVS[:3], OPENINGS[:3]
    sampled = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=3, batch_size=2)
    groups = generate_samples(lively, convs, SYSTEM, sampled, 3, opening=openings)
    assert [len(g) for g in groups] == [3, 3, 3]
    for conv, opening, group in zip(convs, openings, groups, strict=True):
        tokens = len(encode(lively.tokenizer, conv, SYSTEM, opening))
        assert all(c.text.startswith(opening or "") and c.prompt_tokens == tokens for c in group)
    assert any(len({c.text for c in g}) > 1 for g in groups)  # really sampled

    # Greedy, every sample of a conversation is its answer asked alone with its opening.
    greedy = generate_samples(lively, convs, SYSTEM, GREEDY, 2, opening=openings)
    for conv, opening, group in zip(convs, openings, greedy, strict=True):
        alone = generate(lively, [conv], SYSTEM, GREEDY, opening=opening)
        assert texts(group) == texts(alone * 2)


def test_a_wrong_number_of_openings_is_refused_naming_both_counts(lively, tmp_path):
    with pytest.raises(ValueError, match="2 openings for 4 conversations"):
        generate(lively, CONVS, SYSTEM, GREEDY, opening=["a", "b"])
    # generate_samples counts conversations, not samples.
    with pytest.raises(ValueError, match="4 openings for 2 conversations"):
        generate_samples(lively, CONVS[:2], SYSTEM, GREEDY, 2, opening=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="1 openings for 0 conversations"):
        generate(lively, [], SYSTEM, GREEDY, opening=["a"])
    # Refused before any request is sent: nothing listens at this URL.
    with pytest.raises(ValueError, match="3 openings for 4 conversations"):
        generate_remote("http://127.0.0.1:9", "m", CONVS, SYSTEM, GREEDY, opening=["a", None, "b"])
    with pytest.raises(ValueError, match="1 openings for 2 conversations"):
        RemoteGenerator("http://127.0.0.1:9", "m").generate_samples(
            CONVS[:2], SYSTEM, GREEDY, 2, opening=["a"]
        )
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        caching = CachingGenerator(LocalGenerator(lively), cache, "tiny")
        with pytest.raises(ValueError, match="5 openings for 4 conversations"):
            caching.generate(CONVS, SYSTEM, GREEDY, opening=["a"] * 5)
        assert len(cache) == 0
    with pytest.raises(TypeError, match="opening 1 is a int"):
        per_row_openings(["a", 3], 2)  # type: ignore[list-item]
    assert per_row_openings("a", 2) == ["a", "a"] and per_row_openings(None, 1) == [None]


def test_the_cache_keys_each_row_by_its_own_opening(lively, tmp_path):
    # Batches of two: the in-process path asks the misses two at a time, slicing the openings.
    settings = replace(GREEDY, batch_size=2)
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        caching = CachingGenerator(LocalGenerator(lively), cache, "tiny")
        first = caching.generate(CONVS, SYSTEM, settings, opening=OPENINGS)
        assert caching.stats.to_dict()["asked"] == 4 and len(cache) == 4
        assert texts(first) == texts(generate(lively, CONVS, SYSTEM, settings, opening=OPENINGS))

        again = caching.generate(CONVS, SYSTEM, settings, opening=OPENINGS)
        assert texts(again) == texts(first)
        assert caching.stats.hits == 4 and caching.stats.asked == 4

        changed = [*OPENINGS[:2], "Well,", OPENINGS[3]]
        third = caching.generate(CONVS, SYSTEM, settings, opening=changed)
        assert caching.stats.hits == 7 and caching.stats.asked == 5 and len(cache) == 5
        assert third[2].text.startswith("Well,")
        assert texts(third) == texts(generate(lively, CONVS, SYSTEM, settings, opening=changed))

        # One string for every row and the same string per row are the same keys.
        one = caching.generate(CONVS[:2], SYSTEM, settings, opening="hi there!")
        assert caching.stats.asked == 6  # row 0 was cached with "hi there!", row 1 was not
        caching.generate(CONVS[:2], SYSTEM, settings, opening=["hi there!", "hi there!"])
        assert caching.stats.asked == 6 and caching.stats.hits == 7 + 1 + 2
        assert all(c.text.startswith("hi there!") for c in one)


def test_each_remote_request_carries_its_own_rows_opening(lively, lively_dir, monkeypatch):
    from engines.engine_server import EngineServer

    bodies: list[dict] = []
    post = httpx.Client.post

    def recording(self, url, *args, **kwargs):
        bodies.append(kwargs["json"])
        return post(self, url, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "post", recording)
    local = generate(lively, CONVS, SYSTEM, GREEDY, opening=OPENINGS)
    with EngineServer({"lively": lively_dir}, dtype="float32", threads=1) as server:
        bodies.clear()
        remote = generate_remote(server.url, "lively", CONVS, SYSTEM, GREEDY, opening=OPENINGS)
        groups = RemoteGenerator(server.url, "lively").generate_samples(
            CONVS[:2], SYSTEM, GREEDY, 2, opening=OPENINGS[:2]
        )
    # Greedy best-of-2 asks once per conversation (n=1) and copies the answer.
    assert len(bodies) == len(CONVS) + 2 and [b["n"] for b in bodies[-2:]] == [1, 1]

    assert texts(remote) == texts(local)
    for opening, got in zip(OPENINGS, remote, strict=True):
        assert got.text.startswith(opening or "")
    assert [[c.text for c in g] for g in groups] == [[c.text] * 2 for c in local[:2]]

    asked = {b["messages"][-2 if b.get("continue_final_message") else -1]["content"]: b for b in bodies[:4]}
    assert len(asked) == len(CONVS)
    for conv, opening in zip(CONVS, OPENINGS, strict=True):
        body = asked[conv[-1]["content"]]
        if opening is None:  # no assistant message, a plain generation prompt
            assert body["messages"][-1]["role"] == "user" and "continue_final_message" not in body
        else:
            assert body["messages"][-1] == {"role": "assistant", "content": opening}
            assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
