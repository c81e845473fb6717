"""Best-of-N on a remote engine: ONE request per conversation with OpenAI's
`n`, so the engine encodes the prompt once for all its samples. Against a
LIVE hf engine server (fp32, so a row's tokens do not depend on what shares
its batch) behind a small recording proxy that can answer 429; one test
against a real vLLM server (.venv-vllm, built when missing)."""

import socket
import threading
import time
from dataclasses import replace

import pytest

import engines.remote
from engines.engine_server import EngineServer
from engines.generator import CachingGenerator, RemoteGenerator, SampleAsk, sample_requests, sample_seed
from engines.inference import GenerationCancelled, GenerationSettings
from engines.remote import MAX_N, RetryPolicy, TransportStats, generate_remote, split_tokens
from engines.response_cache import ResponseCache
from tests.proxies import Proxy

SYSTEM = "You are the support desk. Answer briefly."
CONVS = [
    [{"role": "user", "content": "How do I reset my password?"}],
    [{"role": "user", "content": "Where is my parcel?"}],
    [{"role": "user", "content": "Can I change my plan?"}],
]
# A row's sampled tokens must not hang on float noise: batches of other sizes or with other prompts'
# padding sum in another order, and over the tiny random model's whole flat 49k-token distribution
# that flips a draw now and then (whichever path sent it); the top 20 are far apart. One request in
# flight keeps an engine batch to one request's rows.
SAMPLED = GenerationSettings(max_new_tokens=8, temperature=1.0, top_k=20, seed=11, batch_size=1)
GREEDY = GenerationSettings(max_new_tokens=8, temperature=0, batch_size=4)
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2, max_total_wait=2.0)


@pytest.fixture(scope="module")
def server(lively_dir, one_torch_thread):
    with EngineServer({"tiny": lively_dir}, dtype="float32", threads=1, batch_window_ms=5) as running:
        yield running


@pytest.fixture
def proxy(server, monkeypatch):
    monkeypatch.setattr(engines.remote, "DEFAULT_RETRY", FAST_RETRY)
    p = Proxy(server.url)
    yield p
    p.close()


def texts(groups):
    return [[c.text for c in g] for g in groups]


def per_sample(url, conv, settings, samples, first=0, opening=None):
    """The old path: one n=1 request per sample, sample s seeded seed + s, one at a time."""
    seeds = [sample_seed(settings, first + s) for s in range(samples)]
    return generate_remote(
        url, "tiny", [conv] * samples, SYSTEM, settings, concurrency=1, seeds=seeds, opening=opening
    )


# --- the transport ---------------------------------------------------------------------


def test_best_of_n_is_one_request_per_conversation_and_counts_n_answers(server, proxy):
    stats = TransportStats()
    seen: list[tuple[int, int]] = []
    calls = server.engine.generate_calls
    groups = RemoteGenerator(proxy.url, "tiny", stats=stats).generate_samples(
        CONVS, SYSTEM, replace(SAMPLED, batch_size=4), 4, progress=lambda p: seen.append((p.done, p.total))
    )
    bodies = proxy.bodies()
    assert len(bodies) == len(CONVS)
    assert [b["n"] for b in bodies] == [4] * 3 and {b["seed"] for b in bodies} == {SAMPLED.seed}
    assert server.engine.generate_calls - calls <= len(CONVS)  # each request's 4 rows ride in one call
    assert [len(g) for g in groups] == [4, 4, 4]
    assert all(len({c.text for c in g}) > 1 for g in groups)  # four seeds, not four copies
    assert stats.requests == 3 and stats.retries == 0 and stats.answers == 12
    # The prompt is billed once per request and shared out: the sums are what the engine reported.
    usages = [s.usage for s in proxy.log]
    assert stats.prompt_tokens == sum(u["prompt_tokens"] for u in usages)
    assert stats.completion_tokens == sum(u["completion_tokens"] for u in usages)
    by_query = {s.body["messages"][1]["content"]: s.usage for s in proxy.log}
    for conv, g in zip(CONVS, groups, strict=True):
        u = by_query[conv[0]["content"]]
        assert sum(c.prompt_tokens for c in g) == u["prompt_tokens"]
        assert sum(c.completion_tokens for c in g) == u["completion_tokens"]
        assert all(c.completion_tokens <= SAMPLED.max_new_tokens for c in g)
    assert seen[-1] == (12, 12) and sorted(d for d, _ in seen) == [4, 8, 12]


def test_the_samples_are_the_ones_one_request_per_sample_gave_with_the_same_seeds(server, proxy):
    openings = [None, "Sure,", "Well, "]
    groups = RemoteGenerator(proxy.url, "tiny").generate_samples(CONVS, SYSTEM, SAMPLED, 4, opening=openings)
    for conv, opening, group in zip(CONVS, openings, groups, strict=True):
        old = per_sample(server.url, conv, SAMPLED, 4, opening=opening)
        assert [c.text for c in group] == [c.text for c in old]
        assert all(c.text.startswith(opening or "") for c in group)
    sent = {b["messages"][1]["content"]: b for b in proxy.bodies()}  # in whatever order they were sent
    assert len(sent) == len(CONVS)
    for conv, opening in zip(CONVS, openings, strict=True):
        body = sent[conv[0]["content"]]
        if opening is None:  # a plain generation prompt
            assert body["messages"][-1]["role"] == "user" and "continue_final_message" not in body
        else:  # the opening is continued, once for all n samples
            assert body["messages"][-1] == {"role": "assistant", "content": opening}
            assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_greedy_samples_ask_once_and_copy(server, proxy):
    stats = TransportStats()
    groups = RemoteGenerator(proxy.url, "tiny", stats=stats).generate_samples(CONVS[:2], SYSTEM, GREEDY, 3)
    assert [b["n"] for b in proxy.bodies()] == [1, 1]  # vLLM refuses n > 1 when greedy
    alone = generate_remote(server.url, "tiny", CONVS[:2], SYSTEM, GREEDY)
    assert texts(groups) == [[a.text] * 3 for a in alone]
    assert stats.answers == 6 and stats.completion_tokens == sum(a.completion_tokens for a in alone)


def test_more_samples_than_one_request_may_ask_go_in_runs_that_keep_their_seeds(server, proxy):
    settings = GenerationSettings(max_new_tokens=3, temperature=1.0, seed=5, batch_size=1)
    (group,) = RemoteGenerator(proxy.url, "tiny").generate_samples(CONVS[:1], SYSTEM, settings, MAX_N + 2)
    assert sorted((b["n"], b["seed"]) for b in proxy.bodies()) == [(2, 5 + MAX_N), (MAX_N, 5)]
    tail = per_sample(server.url, CONVS[0], settings, 2, first=MAX_N)
    assert [c.text for c in group[MAX_N:]] == [c.text for c in tail]


def test_request_groups_keep_each_samples_seed():
    assert sample_requests(range(4), seeded=True) == [(0, 1, 2, 3)]
    assert sample_requests([1, 3, 4, 5], seeded=True) == [(1,), (3, 4, 5)]
    assert sample_requests([1, 3, 4, 5], seeded=False) == [(1, 3, 4, 5)]
    assert sample_requests(range(MAX_N * 2 + 1), seeded=False) == [
        tuple(range(MAX_N)),
        tuple(range(MAX_N, 2 * MAX_N)),
        (2 * MAX_N,),
    ]
    assert sample_requests([], seeded=True) == []


def test_usage_is_split_in_whole_tokens_that_sum_to_the_total():
    assert split_tokens(10, [1, 1, 1]) == [4, 3, 3]
    assert split_tokens(7, [0, 10, 30]) == [0, 2, 5]
    assert split_tokens(5, [0, 0]) == [3, 2]
    assert split_tokens(0, [3, 4]) == [0, 0] and split_tokens(9, []) == []
    # No choice above max_tokens while the total fits: a long text's share is held there.
    assert split_tokens(20, [100, 1, 1, 1], cap=8) == [8, 4, 4, 4]
    assert split_tokens(30, [100, 50, 1, 1], cap=8) == [8, 8, 7, 7]
    assert sum(split_tokens(101, [7, 13, 1, 0, 29])) == 101


def test_a_bad_n_is_refused_before_anything_is_sent(proxy):
    for bad in (0, MAX_N + 1, True, 2.0):
        with pytest.raises(ValueError, match="n for conversation 0"):
            generate_remote(proxy.url, "tiny", CONVS[:1], SYSTEM, SAMPLED, n=[bad])
    with pytest.raises(ValueError, match="1 values of n for 2 conversations"):
        generate_remote(proxy.url, "tiny", CONVS[:2], SYSTEM, SAMPLED, n=[2])
    assert proxy.bodies() == []


def test_a_429_retries_the_whole_n_request_and_the_answers_do_not_change(server, proxy):
    stats = TransportStats()
    proxy.fail_next = [(429, {"Retry-After": "0"})]
    (group,) = RemoteGenerator(proxy.url, "tiny", stats=stats).generate_samples(CONVS[:1], SYSTEM, SAMPLED, 4)
    first, again = proxy.log
    assert (first.outcome, again.outcome) == (429, 200) and first.body == again.body
    assert first.body["n"] == 4
    assert stats.requests == 2 and stats.retries == 1 and stats.answers == 4
    assert [c.text for c in group] == [c.text for c in per_sample(server.url, CONVS[0], SAMPLED, 4)]


def test_on_answer_counts_answers_not_requests(proxy):
    got: dict[int, str] = {}
    asks = [SampleAsk(CONVS[0], None, (0, 1, 2)), SampleAsk(CONVS[1], "Hi", (2, 3))]
    flat = RemoteGenerator(proxy.url, "tiny").ask_samples(
        asks, SYSTEM, SAMPLED, on_answer=lambda i, c: got.__setitem__(i, c.text)
    )
    assert sorted((b["n"], b["seed"]) for b in proxy.bodies()) == [(2, 13), (3, 11)]
    assert got == {i: c.text for i, c in enumerate(flat)} and len(flat) == 5
    assert flat[3].text.startswith("Hi") and flat[4].text.startswith("Hi")


# --- cancel and the response cache ---------------------------------------------------------


def test_a_cancel_between_requests_keeps_what_came_and_the_rerun_asks_only_the_rest(proxy, tmp_path):
    stop = threading.Event()

    def progress(p):
        stop.set()  # after the first answer: the next request is not sent

    cache = ResponseCache(tmp_path / "cache.sqlite3")
    teacher = CachingGenerator(RemoteGenerator(proxy.url, "tiny"), cache, "t")
    with pytest.raises(GenerationCancelled) as caught:
        teacher.generate_samples(CONVS, SYSTEM, SAMPLED, 4, progress=progress, should_stop=stop.is_set)
    assert (caught.value.done, caught.value.total) == (4, 12)
    assert len(proxy.bodies()) == 1 and len(cache) == 4 and teacher.stats.asked == 4

    rerun = CachingGenerator(RemoteGenerator(proxy.url, "tiny"), cache, "t")
    groups = rerun.generate_samples(CONVS, SYSTEM, SAMPLED, 4)
    assert [b["n"] for b in proxy.bodies()] == [4, 4, 4]
    assert rerun.stats.hits == 4 and rerun.stats.asked == 8
    fresh = RemoteGenerator(proxy.url, "tiny").generate_samples(CONVS, SYSTEM, SAMPLED, 4)
    assert texts(groups) == texts(fresh)


def test_a_cached_rerun_asks_nothing_and_a_half_cached_conversation_asks_only_its_missing_samples(
    proxy, tmp_path
):
    path = tmp_path / "cache.sqlite3"

    def teacher() -> CachingGenerator:
        return CachingGenerator(RemoteGenerator(proxy.url, "tiny"), ResponseCache(path), "t")

    half = teacher().generate_samples(CONVS[:2], SYSTEM, SAMPLED, 2)  # samples 0 and 1 of each
    assert [(b["n"], b["seed"]) for b in proxy.bodies()] == [(2, 11), (2, 11)]

    whole = teacher()
    groups = whole.generate_samples(CONVS, SYSTEM, SAMPLED, 4)
    after_half = proxy.bodies()[2:]
    # Conversations 0 and 1 ask for samples 2 and 3 (seeds 13, 14) in one request; 2 asks all four.
    assert sorted((b["messages"][-1]["content"], b["n"], b["seed"]) for b in after_half) == sorted(
        [
            (CONVS[0][0]["content"], 2, 13),
            (CONVS[1][0]["content"], 2, 13),
            (CONVS[2][0]["content"], 4, 11),
        ]
    )
    assert whole.stats.hits == 4 and whole.stats.asked == 8
    assert texts(groups)[:2] == [[*h, *g[2:]] for h, g in zip(texts(half), texts(groups)[:2], strict=True)]
    # The same samples as one uncached request per conversation: the seeds follow the index.
    assert texts(groups) == texts(
        RemoteGenerator(proxy.url, "tiny").generate_samples(CONVS, SYSTEM, SAMPLED, 4)
    )

    sent = len(proxy.bodies())
    rerun = teacher()
    assert texts(rerun.generate_samples(CONVS, SYSTEM, SAMPLED, 4)) == texts(groups)
    assert len(proxy.bodies()) == sent and rerun.stats.hits == 12 and rerun.stats.asked == 0


def test_a_repeated_best_of_n_round_asks_fresh_samples_in_one_request_each(proxy, tmp_path):
    """The cache's k-th repeat of a sampled request takes indexes k*N..: one run, so one request."""
    teacher = CachingGenerator(RemoteGenerator(proxy.url, "tiny"), ResponseCache(tmp_path / "c.sqlite3"), "t")
    round1 = teacher.generate_samples(CONVS[:1], SYSTEM, SAMPLED, 3)
    round2 = teacher.generate_samples(CONVS[:1], SYSTEM, SAMPLED, 3)
    assert [(b["n"], b["seed"]) for b in proxy.bodies()] == [(3, 11), (3, 14)]
    assert texts(round1) != texts(round2)


# --- vLLM ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_answers_n_samples_in_one_request_with_the_per_sample_seeds(
    smollm2_dir, vllm_python_built, tmp_path
):
    """vLLM seeds child j of a request seeded s with s + j (its parallel sampling), as the hf engine does."""
    from engines.vllm_server import start_vllm, stop_vllm, wait_ready

    python = vllm_python_built
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_vllm(
        python, smollm2_dir, "base", port, tmp_path / "vllm.log", kv_cache_gib=1, dtype="float32"
    )
    try:
        wait_ready(url, proc, timeout=300, log_path=tmp_path / "vllm.log")
        settings = GenerationSettings(max_new_tokens=12, temperature=1.0, seed=21, batch_size=4)
        stats = TransportStats()
        began = time.monotonic()
        groups = RemoteGenerator(url, "base", stats=stats).generate_samples(
            CONVS[:2], SYSTEM, settings, 4, opening="Sure,"
        )
        print(f"\nvLLM: 2 x 4 samples in {time.monotonic() - began:.1f} s")
        assert stats.requests == 2 and stats.answers == 8
        assert all(c.text.startswith("Sure,") for g in groups for c in g)
        for conv, group in zip(CONVS[:2], groups, strict=True):
            seeds = [sample_seed(settings, s) for s in range(4)]
            old = generate_remote(
                url, "base", [conv] * 4, SYSTEM, settings, concurrency=1, seeds=seeds, opening="Sure,"
            )
            same = sum(a.text == b.text for a, b in zip(group, old, strict=True))
            # Seeded alike; batched kernels may still flip a near-tie now and then.
            assert same >= 3, ([c.text for c in group], [c.text for c in old])
            assert len({c.text for c in group}) > 1
    finally:
        stop_vllm(proc)
