"""The /v1 compatibility suite (issue 22): the clients people use, the real
`openai` SDK (sync, async, streaming, parse()) and LangChain's ChatOpenAI,
against a live gateway forwarding to the hf engine on the tiny model. Each
parameter's effect is asserted, not only a 200, and each refusal's shape as
the SDK raises it. The engine-level checks are in tests/test_engine_params.py."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Annotated

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from engines.chat import render
from engines.inference import encode
from tests import test_gateway
from tests.test_gateway import QUESTION, sdk
from workbench.models import FoundationModel, Variant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# test_gateway's fixtures (its engine, project, key, variants and aliases), used here by name.
adapter_dir = test_gateway.adapter_dir
engine = test_gateway.engine
served = test_gateway.served
tokenizer = test_gateway.tokenizer
world = test_gateway.world

GREEDY = {"temperature": 0, "max_tokens": 12}
STORY = "Once upon a time"


class Verdict(BaseModel):
    """Short enough to close within max_tokens: no free-form strings."""

    ok: bool
    stars: Annotated[int, Field(ge=1, le=5)]


RATING = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["color", "size"],
    "additionalProperties": False,
}


def compact(tokenizer) -> dict[str, int]:
    """A logit_bias banning the whitespace-only tokens (166 of them): the
    grammar allows whitespace between JSON tokens, and the random tiny model
    would spend every token of max_tokens on it."""
    pieces = ((i, tokenizer.decode([i])) for i in range(len(tokenizer)))
    return {str(i): -100 for i, piece in pieces if piece and not piece.strip()}


@pytest.fixture
def client(live_server, world, served) -> openai.OpenAI:
    return sdk(live_server, world.raw)


@pytest.fixture
def plain(world) -> str:
    """The base model as served: no adapter, no prompt."""
    return f"{world.slug}/plain"


@pytest.fixture
def looping(world, tiny_model_dir) -> str:
    """A variant on the default-initialised tiny model, which repeats one
    token: the only model where a penalty's effect is certain."""
    base = FoundationModel.objects.create(name="tiny-looping", path=str(tiny_model_dir))
    variant = Variant.objects.create(project=world.plain.project, name="looping", base_model=base)
    return f"{world.slug}/variant-{variant.pk}"


def chat(live_server, world, model: str, **kwargs) -> ChatOpenAI:
    options = {"temperature": 0, "max_tokens": 12, **kwargs}
    return ChatOpenAI(
        model=model,
        base_url=f"{live_server.url}/v1",
        api_key=world.raw,
        max_retries=0,
        timeout=120,
        **options,
    )


def text_of(answer) -> str:
    return answer.choices[0].message.content


# --- logprobs, logit_bias, penalties, vLLM's extras ---------------------------------


def test_logprobs_are_sane_whole_and_streamed(client, plain):
    raw = client.chat.completions.with_raw_response.create(
        model=plain, messages=QUESTION, logprobs=True, top_logprobs=3, **GREEDY
    )
    assert raw.headers["x-request-id"].startswith("req_")
    answer = raw.parse()
    content = answer.choices[0].logprobs.content
    assert content and "".join(t.token for t in content) == text_of(answer)
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy takes the most likely token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        tops = [t.logprob for t in token.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(v) for v in tops) <= 1 + 1e-6
    assert math.isfinite(sum(t.logprob for t in content))
    assert (
        client.chat.completions.create(model=plain, messages=QUESTION, **GREEDY).choices[0].logprobs is None
    )

    streamed = [
        t
        for chunk in client.chat.completions.create(
            model=plain, messages=QUESTION, logprobs=True, top_logprobs=3, stream=True, **GREEDY
        )
        for choice in chunk.choices
        if choice.logprobs is not None
        for t in choice.logprobs.content
    ]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [
        (t.token, round(t.logprob, 5)) for t in content
    ]


def test_a_logit_bias_of_100_forces_its_token_and_minus_100_bans_it(client, plain, tokenizer):
    banana = tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = client.chat.completions.create(
        model=plain, messages=QUESTION, logit_bias={str(banana): 100}, temperature=0, max_tokens=4
    )
    assert text_of(forced) == tokenizer.decode([banana]) * 4
    greedy = client.chat.completions.create(model=plain, messages=QUESTION, logprobs=True, **GREEDY)
    first = tokenizer.encode(greedy.choices[0].logprobs.content[0].token, add_special_tokens=False)[0]
    banned = client.chat.completions.create(
        model=plain, messages=QUESTION, logit_bias={str(first): -100}, **GREEDY
    )
    assert not text_of(banned).startswith(greedy.choices[0].logprobs.content[0].token)


def test_penalties_change_the_greedy_answer(client, looping, tokenizer):
    def tokens(**kwargs) -> list[int]:
        answer = client.chat.completions.create(model=looping, messages=QUESTION, **GREEDY, **kwargs)
        return tokenizer.encode(text_of(answer), add_special_tokens=False)

    plain = tokens()
    assert len(set(plain)) <= 2  # it loops
    assert len(set(tokens(frequency_penalty=2.0))) > 4
    assert len(set(tokens(presence_penalty=2.0))) > 4
    assert tokens(frequency_penalty=0.0, presence_penalty=0.0) == plain


def test_vllm_extras_are_forwarded_and_honoured(client, plain, engine):
    greedy = text_of(client.chat.completions.create(model=plain, messages=QUESTION, **GREEDY))
    hot = {"model": plain, "messages": QUESTION, "temperature": 1.5, "seed": 3, "max_tokens": 12}
    assert text_of(client.chat.completions.create(**hot)) != greedy  # so the next two can fail
    assert text_of(client.chat.completions.create(**hot, extra_body={"top_k": 1})) == greedy
    assert text_of(client.chat.completions.create(**hot, extra_body={"min_p": 1.0})) == greedy

    eos = {str(engine.engine.loaded("tiny-lively").stop_token_ids[0]): 100}
    ask = {"model": plain, "messages": QUESTION, "temperature": 0, "logit_bias": eos}
    short = client.chat.completions.create(**ask, max_tokens=12)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (1, "stop")
    held = client.chat.completions.create(**ask, max_tokens=12, extra_body={"min_tokens": 5})
    assert (held.usage.completion_tokens, held.choices[0].finish_reason) == (6, "stop")
    endless = client.chat.completions.create(**ask, max_tokens=7, extra_body={"ignore_eos": True})
    assert (endless.usage.completion_tokens, endless.choices[0].finish_reason) == (7, "length")
    # max_completion_tokens wins over max_tokens when both are sent
    both = client.chat.completions.create(
        **ask, max_tokens=12, max_completion_tokens=3, extra_body={"ignore_eos": True}
    )
    assert both.usage.completion_tokens == 3


def test_stop_reason_names_the_stop_string(client, plain):
    full = text_of(client.chat.completions.create(model=plain, messages=QUESTION, **GREEDY))
    stop = full[3:6]
    cut = client.chat.completions.create(model=plain, messages=QUESTION, stop=[stop, "zzzz-never"], **GREEDY)
    assert text_of(cut) == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop
    short = client.chat.completions.create(model=plain, messages=QUESTION, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.choices[0].model_extra["stop_reason"] is None


def test_continue_final_message_prefills_the_answer(client, plain, tokenizer):
    opening = "Your parcel"
    prefilled = client.chat.completions.create(
        model=plain,
        messages=[*QUESTION, {"role": "assistant", "content": opening}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
        **GREEDY,
    )
    assert prefilled.usage.prompt_tokens == len(encode(tokenizer, QUESTION, None, opening=opening))
    # The same tokens as raw text through /v1/completions: the same greedy continuation.
    raw = client.completions.create(model=plain, prompt=render(tokenizer, QUESTION, None) + opening, **GREEDY)
    assert text_of(prefilled) == raw.choices[0].text
    ends = client.chat.completions.create(
        model=plain, messages=QUESTION, extra_body={"add_generation_prompt": False}, **GREEDY
    )
    assert ends.usage.prompt_tokens == len(encode(tokenizer, QUESTION, None, generation_prompt=False))


# --- response_format --------------------------------------------------------------


def test_json_schema_answers_validate_and_parse_returns_the_model(client, plain, tokenizer):
    free = client.chat.completions.create(model=plain, messages=QUESTION, temperature=0, max_tokens=16)
    assert not text_of(free).lstrip().startswith("{")  # unconstrained, no JSON: the checks below can fail
    bias = compact(tokenizer)

    parsed = client.chat.completions.parse(
        model=plain, messages=QUESTION, response_format=Verdict, logit_bias=bias, temperature=0, max_tokens=16
    )
    message = parsed.choices[0].message
    assert isinstance(message.parsed, Verdict)
    jsonschema.validate(json.loads(message.content), Verdict.model_json_schema())

    rating = {"type": "json_schema", "json_schema": {"name": "rating", "schema": RATING, "strict": True}}
    for seed in (1, 2, 3):
        rated = client.chat.completions.create(
            model=plain,
            messages=QUESTION,
            response_format=rating,
            logit_bias=bias,
            temperature=1.0,
            seed=seed,
            max_tokens=16,
        )
        assert rated.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(rated)), RATING)

    # A free-form object's keys are random text that 16 tokens do not close: it begins as one.
    whole = client.chat.completions.create(
        model=plain, messages=QUESTION, response_format={"type": "json_object"}, temperature=0, max_tokens=16
    )
    assert text_of(whole).startswith('{"')


# --- seeds and batching -----------------------------------------------------------


def test_seeded_streams_give_the_same_text_alone_or_batched(live_server, world, served, plain):
    seeds = range(21, 29)

    async def one(client: openai.AsyncOpenAI, seed: int) -> str:
        stream = await client.chat.completions.create(
            model=plain, messages=QUESTION, temperature=1.0, seed=seed, max_tokens=10, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> tuple[list[str], list[str], int]:
        client = openai.AsyncOpenAI(
            base_url=f"{live_server.url}/v1", api_key=world.raw, max_retries=0, timeout=120
        )
        async with client:
            alone = [
                text_of(
                    await client.chat.completions.create(
                        model=plain, messages=QUESTION, temperature=1.0, seed=s, max_tokens=10
                    )
                )
                for s in seeds
            ]
            calls = served.engine.generate_calls
            together = await asyncio.gather(*(one(client, s) for s in seeds))
            return alone, list(together), served.engine.generate_calls - calls

    alone, together, calls = asyncio.run(run())
    assert together == alone
    assert len(set(alone)) > 4  # the seeds do differ
    assert calls < len(alone)  # and some rows did share a batch

    client = sdk(live_server, world.raw)
    samples = client.chat.completions.create(
        model=plain, messages=QUESTION, n=3, temperature=1.0, seed=5, max_tokens=8
    )
    again = client.chat.completions.create(
        model=plain, messages=QUESTION, n=3, temperature=1.0, seed=5, max_tokens=8
    )
    texts = [c.message.content for c in samples.choices]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    single = client.chat.completions.create(
        model=plain, messages=QUESTION, temperature=1.0, seed=5, max_tokens=8
    )
    assert text_of(single) == texts[0]  # sample 0 of n is the n=1 answer


# --- refusals ---------------------------------------------------------------------

TOOL = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
}
CALLED = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}


NO_TOOLS = "this model does not call tools"
# name: (the request's fields, the params the 400 may name, words its message must hold)
REFUSALS = {
    "tools": ({"tools": [TOOL]}, {"tools"}, NO_TOOLS),
    "tool_choice": ({"tool_choice": "required"}, {"tool_choice"}, NO_TOOLS),
    "both": ({"tools": [TOOL], "tool_choice": "required"}, {"tools", "tool_choice"}, NO_TOOLS),
    "tool message": (
        {"messages": [*QUESTION, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]},
        {"messages[1].role"},
        NO_TOOLS,
    ),
    "tool call": (
        {"messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [CALLED]}]},
        {"messages[1].tool_calls"},
        NO_TOOLS,
    ),
    "unknown field": (
        {"extra_body": {"frobnicate": 1}},
        {"frobnicate"},
        "Unrecognized request argument supplied: frobnicate",
    ),
    "guided_json": ({"extra_body": {"guided_json": {"type": "object"}}}, {"guided_json"}, "response_format"),
    "n too large": ({"n": 17}, {"n"}, "n "),
    "penalty too large": ({"frequency_penalty": 3}, {"frequency_penalty"}, "frequency_penalty"),
    "top_logprobs alone": ({"top_logprobs": 2}, {"top_logprobs"}, "logprobs: true"),
    "token not in vocabulary": ({"logit_bias": {"999999": 5}}, {"logit_bias"}, "999999"),
    "schema missing": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"response_format"},
        "schema",
    ),
}


def test_each_refusal_is_an_openai_400_naming_the_field(client, plain, engine):
    # One test, every case (a live test's setup costs ~1 s): each mismatch is listed by name.
    calls = engine.engine.generate_calls
    wrong = {}
    for name, (kwargs, params, words) in REFUSALS.items():
        try:
            client.chat.completions.create(
                **{"model": plain, "messages": QUESTION, "max_tokens": 4, **kwargs}
            )
        except openai.BadRequestError as err:
            body = err.body
            assert isinstance(body, dict)
            ok = (
                body.get("type") == "invalid_request_error"
                and body.get("param") in params
                and words in body.get("message", "")
                and body["message"].endswith(f"(request id {err.response.headers['x-request-id']})")
            )
            if not ok:
                wrong[name] = body
        except openai.APIError as err:
            wrong[name] = f"{type(err).__name__}: {err}"
        else:
            wrong[name] = "answered 200"
    assert wrong == {}
    assert engine.engine.generate_calls == calls  # refused before any generation


def test_langchain_bind_tools_is_refused_not_answered_in_prose(live_server, world, served, plain):
    with pytest.raises(openai.BadRequestError) as err:
        chat(live_server, world, plain).bind_tools([Verdict]).invoke("How are you?")
    assert err.value.body["param"] == "tools"


# --- the legacy /v1/completions ------------------------------------------------------


def test_legacy_completions_text_echo_logprobs_and_stream(client, plain, tokenizer, world):
    raw = client.completions.with_raw_response.create(model=plain, prompt=STORY, **GREEDY)
    assert raw.headers["x-request-id"].startswith("req_")
    answer = raw.parse()
    text = answer.choices[0].text
    assert answer.object == "text_completion" and text and answer.model == plain
    assert answer.system_fingerprint and answer.usage.prompt_tokens == len(tokenizer(STORY)["input_ids"])

    echoed = client.completions.create(model=plain, prompt=STORY, echo=True, **GREEDY)
    assert echoed.choices[0].text == STORY + text

    scored = client.completions.create(model=plain, prompt=STORY, logprobs=2, **GREEDY)
    lp = scored.choices[0].logprobs
    assert "".join(lp.tokens) == scored.choices[0].text == text
    assert all(v <= 0 for v in lp.token_logprobs) and math.isfinite(sum(lp.token_logprobs))
    for token, value, tops in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(tops) == 2 and max(tops.values()) == pytest.approx(value) and token in tops

    pieces = [
        c.text
        for chunk in client.completions.create(model=plain, prompt=STORY, stream=True, **GREEDY)
        for c in chunk.choices
    ]
    assert "".join(pieces) == text

    two = client.completions.create(model=plain, prompt=[STORY, "The sky"], **GREEDY)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text

    with pytest.raises(openai.BadRequestError) as err:  # a prompted variant needs the chat endpoint
        client.completions.create(model=f"{world.slug}/staging", prompt=STORY, **GREEDY)
    assert err.value.body["param"] == "model"


# --- the envelope -----------------------------------------------------------------


def test_every_answer_has_a_request_id_and_a_fingerprint(client, plain, world):
    raw = client.chat.completions.with_raw_response.create(model=plain, messages=QUESTION, **GREEDY)
    answer = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert answer.system_fingerprint and answer.system_fingerprint.startswith("fp_")
    again = client.chat.completions.with_raw_response.create(model=plain, messages=QUESTION, **GREEDY)
    assert again.headers["x-request-id"] != raw.headers["x-request-id"]
    assert again.parse().system_fingerprint == answer.system_fingerprint  # one deployment, one fingerprint
    other = client.chat.completions.create(model=f"{world.slug}/production", messages=QUESTION, **GREEDY)
    assert other.system_fingerprint != answer.system_fingerprint  # another variant

    streamed = client.chat.completions.with_raw_response.create(
        model=plain, messages=QUESTION, stream=True, **GREEDY
    )
    assert streamed.headers["x-request-id"].startswith("req_")
    assert {c.system_fingerprint for c in streamed.parse()} == {answer.system_fingerprint}
    assert client.models.with_raw_response.list().headers["x-request-id"].startswith("req_")

    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model=plain, input="hello")
    assert err.value.body["code"] == "unknown_url" and "/v1/chat/completions" in err.value.body["message"]
    assert err.value.response.headers["x-request-id"].startswith("req_")


# --- LangChain's ChatOpenAI ----------------------------------------------------------


def test_langchain_invoke_stream_logprobs_and_structured_output(
    live_server, world, served, client, plain, tokenizer
):
    sdk_text = text_of(client.chat.completions.create(model=plain, messages=QUESTION, **GREEDY))
    llm = chat(live_server, world, plain)
    question = QUESTION[0]["content"]

    message = llm.invoke(question)
    assert message.content == sdk_text
    assert message.response_metadata["model_name"] == plain
    assert message.response_metadata["system_fingerprint"].startswith("fp_")
    assert 0 < message.usage_metadata["output_tokens"] <= 12

    assert "".join(chunk.content for chunk in llm.stream(question)) == sdk_text

    scored = llm.bind(logprobs=True, top_logprobs=2).invoke(question)
    content = scored.response_metadata["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == scored.content == sdk_text
    assert all(t["logprob"] <= 0 and t["top_logprobs"][0]["token"] == t["token"] for t in content)

    # LangChain sends max_tokens as max_completion_tokens: the greedy answer, cut short
    short = chat(live_server, world, plain, max_tokens=3).invoke(question)
    assert short.usage_metadata["output_tokens"] == min(3, message.usage_metadata["output_tokens"])
    assert sdk_text.startswith(short.content)

    structured = chat(live_server, world, plain, max_tokens=16, logit_bias=compact(tokenizer))
    verdict = structured.with_structured_output(Verdict, method="json_schema", strict=True)
    assert isinstance(verdict.invoke(question), Verdict)

    async def both() -> list[str]:
        answers = await asyncio.gather(llm.ainvoke(question), llm.ainvoke(question))
        return [a.content for a in answers]

    assert asyncio.run(both()) == [sdk_text, sdk_text]
