"""response_format as constrained decoding (engines.inference.grammar): the
real SmolLM2 tokenizer, a decode loop driven by random logits of the model's
width, so only the grammar can make the text valid JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from engines.inference import grammar
from engines.inference.grammar import apply, constraint, grammar_for
from engines.protocol import OpenAIError

torch = pytest.importorskip("torch")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
COLORS = ["red", "green", "blue"]


def schema_format(schema: dict[str, Any], strict: bool | None = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "answer", "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


def compiled(response_format: Any) -> str:
    text = grammar_for(response_format)
    assert isinstance(text, str)
    return text


def violations(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """The subset of JSON Schema that PERSON uses, checked by hand (no jsonschema in the venv)."""
    found: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} not in {schema['enum']}")
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        found += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            found += [f"{where}: extra {k}" for k in value if k not in props]
        for k, sub in props.items():
            if k in value:
                found += violations(value[k], sub, f"{where}.{k}")
    elif kind == "string":
        if not isinstance(value, str) or len(value) > schema.get("maxLength", len(value)):
            found.append(f"{where}: bad string {value!r}")
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            found.append(f"{where}: not an integer: {value!r}")
        elif not schema.get("minimum", value) <= value <= schema.get("maximum", value):
            found.append(f"{where}: {value} out of range")
    elif kind == "array":
        if not isinstance(value, list) or len(value) > schema.get("maxItems", len(value)):
            return [f"{where}: bad array {value!r}"]
        for i, item in enumerate(value):
            found += violations(item, schema["items"], f"{where}[{i}]")
    return found


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def vocab(smollm2_dir: Path) -> int:
    return int(json.loads((smollm2_dir / "config.json").read_text())["vocab_size"])


@pytest.fixture(scope="module")
def eos(tokenizer: Any) -> int:
    """The chat template's end token, which the engine stops on (loaded.stop_token_ids)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tokenizer.eos_token_id == 2
    return int(im_end)


def decode(
    tokenizer: Any,
    text: str,
    vocab: int,
    eos: int,
    seed: int,
    *,
    sample: bool = False,
    closers: list[int] | None = None,
    max_steps: int = 600,
) -> str:
    """Random logits each step, masked by the grammar, then argmax (or a draw);
    `closers` get a bias that grows each step, like a model that wants to finish."""
    gen = torch.Generator().manual_seed(seed)
    row = constraint(tokenizer, text, [eos], vocab)
    tokens: list[int] = []
    for step in range(max_steps):
        scores = torch.randn(1, vocab, generator=gen) * 2
        if closers:
            scores[0, closers] += 0.1 * step
        apply(scores, [(0, row)])
        if sample:
            token = int(torch.multinomial(torch.softmax(scores[0], dim=-1), 1, generator=gen))
        else:
            token = int(scores[0].argmax())
        assert torch.isfinite(scores[0, token]), "picked a forbidden token"
        row.accept(token)
        if token == eos:
            assert row.done and not row.error
            return tokenizer.decode(tokens)
        tokens.append(token)
    pytest.fail(f"no end of sequence after {max_steps} steps: {tokenizer.decode(tokens)!r}")


def allowed_ids(row: Any, vocab: int) -> set[int]:
    scores = torch.zeros(1, vocab)
    apply(scores, [(0, row)])
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def test_it_leaves_text_unconstrained() -> None:
    assert grammar_for(None) is None
    assert grammar_for({"type": "text"}) is None


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("sample", [False, True], ids=["argmax", "sampled"])
def test_it_follows_a_json_schema_under_random_logits(
    tokenizer: Any, vocab: int, eos: int, seed: int, sample: bool
) -> None:
    text = decode(tokenizer, compiled(schema_format(PERSON)), vocab, eos, seed, sample=sample)
    value = json.loads(text)
    assert violations(value, PERSON) == [], text


def test_the_check_itself_can_fail() -> None:
    """The hand-written validator catches what the grammar prevents."""
    good = {"name": "a", "age": 3, "color": "red", "tags": [], "address": {"city": "x", "zip": 1}}
    assert violations(good, PERSON) == []
    assert violations({**good, "age": 151}, PERSON)
    assert violations({**good, "color": "pink"}, PERSON)
    assert violations({**good, "extra": 1}, PERSON)
    assert violations({**good, "address": {"city": "x"}}, PERSON)
    assert violations({**good, "tags": ["x"] * 4}, PERSON)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_json_object_gives_a_json_object(tokenizer: Any, vocab: int, eos: int, seed: int) -> None:
    closers = [tokenizer.convert_tokens_to_ids(t) for t in ['"', "}", "]"]]
    assert all(isinstance(t, int) and t != tokenizer.unk_token_id for t in closers)
    text = decode(
        tokenizer,
        compiled({"type": "json_object"}),
        vocab,
        eos,
        seed,
        closers=closers,
        sample=seed % 2 == 1,
    )
    assert isinstance(json.loads(text), dict), text


def test_an_enum_yields_only_its_values(tokenizer: Any, vocab: int, eos: int) -> None:
    text = compiled(schema_format({"enum": COLORS}))
    seen = {json.loads(decode(tokenizer, text, vocab, eos, seed)) for seed in range(12)}
    assert seen <= set(COLORS)
    assert len(seen) > 1  # the logits really are random


def test_eos_is_refused_until_the_json_is_complete_then_forced(tokenizer: Any, vocab: int) -> None:
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    row = constraint(tokenizer, compiled(schema_format(schema)), [im_end, endoftext], vocab)
    assert im_end not in allowed_ids(row, vocab)
    for token in tokenizer.encode('{"a": 5', add_special_tokens=False):
        row.accept(token)
    open_ids = allowed_ids(row, vocab)
    assert tokenizer.convert_tokens_to_ids("}") in open_ids and im_end not in open_ids
    assert not row.done
    row.accept(tokenizer.convert_tokens_to_ids("}"))
    assert row.done
    # Both stop ids end the row, not just the tokenizer's own eos.
    assert allowed_ids(row, vocab) == {im_end, endoftext}
    row.accept(endoftext)
    assert row.done and row.error == ""


def test_eos_is_allowed_where_the_json_may_end_or_go_on(tokenizer: Any, vocab: int, eos: int) -> None:
    row = constraint(tokenizer, compiled(schema_format({"type": "integer"})), [eos], vocab)
    for token in tokenizer.encode("12", add_special_tokens=False):
        row.accept(token)
    allowed = allowed_ids(row, vocab)
    assert eos in allowed and tokenizer.convert_tokens_to_ids("3") in allowed
    assert not row.done


def test_it_masks_only_the_rows_it_is_given(tokenizer: Any, vocab: int, eos: int) -> None:
    text = compiled({"type": "json_object"})
    first, second = constraint(tokenizer, text, [eos], vocab), constraint(tokenizer, text, [eos], vocab)
    for token in tokenizer.encode('{"k": ', add_special_tokens=False):
        second.accept(token)  # rows of one batch stand at different places
    scores = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    before = scores.clone()
    apply(scores, [(3, first), (1, second)])
    assert torch.equal(scores[0], before[0]) and torch.equal(scores[2], before[2])
    assert set(torch.isfinite(scores[3]).nonzero().flatten().tolist()) == allowed_ids(first, vocab)
    assert set(torch.isfinite(scores[1]).nonzero().flatten().tolist()) == allowed_ids(second, vocab)
    assert all(tokenizer.decode([t]).lstrip().startswith("{") for t in allowed_ids(first, vocab))
    # Kept scores are untouched, not reset.
    kept = torch.isfinite(scores[1])
    assert torch.equal(scores[1][kept], before[1][kept])


def test_logits_past_the_tokenizer_are_never_allowed(tokenizer: Any, vocab: int, eos: int) -> None:
    wide = vocab + 64  # models pad their embedding past the tokenizer
    row = constraint(tokenizer, compiled({"type": "json_object"}), [eos], wide)
    row.accept(tokenizer.convert_tokens_to_ids("{"))
    scores = torch.zeros(2, wide)
    apply(scores, [(0, row)])
    assert torch.isneginf(scores[0, vocab:]).all()
    assert torch.isfinite(scores[0, :vocab]).any()
    assert torch.equal(scores[1], torch.zeros(wide))


def test_the_grammar_outranks_earlier_masks(tokenizer: Any, vocab: int, eos: int) -> None:
    """A processor before it (min_tokens, no-repeat n-grams) may have banned
    every token the grammar allows: the row must still get a valid token."""
    row = constraint(tokenizer, compiled({"type": "json_object"}), [eos], vocab)
    brace = tokenizer.convert_tokens_to_ids("{")
    scores = torch.zeros(1, vocab)
    scores[0, brace] = -float("inf")
    apply(scores, [(0, row)])
    assert scores[0].argmax().item() in allowed_ids(row, vocab)
    assert torch.isfinite(scores[0]).any()


@pytest.mark.parametrize("width", [150, 160, 170])
def test_both_ways_of_reading_the_bitmask_agree(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """numpy's unpackbits on CPU; torch's shifts elsewhere (GPU scores): both bit j of word w is token 32w+j."""
    import numpy as np

    bitmask = np.random.default_rng(0).integers(-(2**31), 2**31, size=(3, 5)).astype(np.int32)
    expected = [
        [t < 160 and bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1) for t in range(width)] for r in range(3)
    ]
    fast = grammar._unpack(bitmask, width, torch.device("cpu"))
    monkeypatch.setattr(grammar.sys, "byteorder", "big")  # forces the torch path
    shifted = grammar._unpack(bitmask, width, torch.device("cpu"))
    assert fast.tolist() == expected
    assert shifted.tolist() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_it_masks_scores_on_the_gpu_as_on_the_cpu(tokenizer: Any, vocab: int, eos: int) -> None:
    text = compiled(schema_format(PERSON))
    rows = [constraint(tokenizer, text, [eos], vocab) for _ in range(2)]
    for token in tokenizer.encode('{"name": "x", "age": 1', add_special_tokens=False):
        rows[1].accept(token)
    cpu = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    gpu = cpu.to("cuda", dtype=torch.bfloat16)
    apply(cpu, [(0, rows[0]), (2, rows[1])])
    apply(gpu, [(0, rows[0]), (2, rows[1])])
    assert torch.equal(torch.isfinite(gpu).cpu(), torch.isfinite(cpu))


def test_accept_refuses_a_token_the_grammar_forbids(tokenizer: Any, vocab: int, eos: int) -> None:
    row = constraint(tokenizer, compiled({"type": "json_object"}), [eos], vocab)
    with pytest.raises(ValueError, match="breaks the response_format grammar"):
        row.accept(tokenizer.convert_tokens_to_ids("hello"))
    with pytest.raises(ValueError):
        constraint(tokenizer, compiled({"type": "json_object"}), [eos], vocab).accept(eos)


def test_rows_of_one_grammar_do_not_share_state(tokenizer: Any, vocab: int, eos: int) -> None:
    text = compiled(schema_format({"type": "array", "items": {"type": "integer"}}))
    a, b = constraint(tokenizer, text, [eos], vocab), constraint(tokenizer, text, [eos], vocab)
    for token in tokenizer.encode("[1]", add_special_tokens=False):
        a.accept(token)
    assert a.done and not b.done
    assert allowed_ids(b, vocab) == allowed_ids(constraint(tokenizer, text, [eos], vocab), vocab)


def test_compiled_grammars_are_kept_in_a_small_lru(tokenizer: Any, vocab: int, eos: int) -> None:
    for i in range(grammar.MATCHERS_PER_TOKENIZER + 8):
        constraint(tokenizer, compiled(schema_format({"const": i})), [eos], vocab)
    vocabulary = grammar._vocabularies[tokenizer][((eos,), vocab)]
    assert len(vocabulary.matchers) == grammar.MATCHERS_PER_TOKENIZER
    started = time.perf_counter()
    constraint(tokenizer, compiled(schema_format({"const": 1})), [eos], vocab)  # a fresh compile
    constraint(tokenizer, compiled(schema_format({"const": 1})), [eos], vocab)  # from the cache
    assert time.perf_counter() - started < 1.0  # the tokenizer (~0.6 s to build) is not rebuilt


def test_strict_refuses_keywords_it_cannot_enforce_and_non_strict_ignores_them() -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(OpenAIError) as caught:
        grammar_for(schema_format(schema, strict=True))
    assert "uniqueItems" in caught.value.message
    assert grammar_for(schema_format(schema, strict=False))
    assert grammar_for(schema_format(schema, strict=None))


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


BAD = {
    "a string": "json",
    "a list": [{"type": "json_object"}],
    "no type": {},
    "unknown type": {"type": "xml"},
    "type not a string": {"type": 5},
    "json_schema missing": {"type": "json_schema"},
    "json_schema not an object": {"type": "json_schema", "json_schema": "answer"},
    "no schema": {"type": "json_schema", "json_schema": {"name": "answer"}},
    "schema a list": {"type": "json_schema", "json_schema": {"name": "answer", "schema": [1]}},
    "schema a string": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": '{"type": "object"}'},
    },
    "no name": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
    "empty name": {"type": "json_schema", "json_schema": {"name": "", "schema": {"type": "object"}}},
    "name with spaces": {"type": "json_schema", "json_schema": {"name": "my answer", "schema": {}}},
    "long name": {"type": "json_schema", "json_schema": {"name": "a" * 65, "schema": {}}},
    "strict not a bool": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}},
    "description not a string": {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {}, "description": 1},
    },
    "schema beside json_object": {"type": "json_object", "schema": {"type": "object"}},
    "unknown json_schema field": {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {}, "extra": 1},
    },
    "type not a type": schema_format({"type": 5}),
    "unknown type name": schema_format({"type": "thing"}),
    "missing $ref": schema_format({"$ref": "#/$defs/nope"}),
    "bad pattern": schema_format({"type": "string", "pattern": "(("}),
    "NaN in schema": schema_format({"type": "number", "maximum": float("nan")}),
    "not JSON at all": schema_format({"type": "object", "default": object()}),
    "too deep": schema_format(nested(40)),
    "too big": schema_format(
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    ),
}


@pytest.mark.parametrize("value", BAD.values(), ids=BAD.keys())
def test_every_bad_response_format_is_a_400(value: Any) -> None:
    with pytest.raises(OpenAIError) as caught:
        grammar_for(value)
    error = caught.value
    assert error.status == 400 and error.param == "response_format"
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert len(error.message) > 20 and "Traceback" not in error.message


def test_a_deeply_nested_or_huge_schema_is_refused_quickly() -> None:
    deep = nested(100_000)  # the stdlib's json.dumps would hit the recursion limit
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(200_000)}}
    for schema in (deep, huge):
        started = time.perf_counter()
        with pytest.raises(OpenAIError) as caught:
            grammar_for(schema_format(schema))
        assert time.perf_counter() - started < 2.0
        assert caught.value.status == 400


def doubling(levels: int) -> dict[str, Any]:
    """Each definition uses the previous one twice: 2**levels if expanded."""
    defs: dict[str, Any] = {"d0": {"type": "string", "maxLength": 3}}
    for i in range(1, levels):
        ref = {"$ref": f"#/$defs/d{i - 1}"}
        defs[f"d{i}"] = {"type": "array", "prefixItems": [ref, ref], "minItems": 2, "maxItems": 2}
    return {"$defs": defs, "$ref": f"#/$defs/d{levels - 1}"}


HOSTILE = {
    "exponential regex": {"type": "string", "pattern": "^(a|b)*a(a|b){40}$"},
    "nested repeats": {"type": "string", "pattern": "^(a|b|ab){1000}{1000}$"},
    "doubling refs": doubling(60),
    "many alternatives": {
        "anyOf": [
            {"type": "object", "properties": {f"k{i}": {"const": i}}, "required": [f"k{i}"]}
            for i in range(500)
        ]
    },
    "huge ranges": {"type": "integer", "minimum": -(10**15), "maximum": 10**15},
    "huge counts": {"type": "array", "items": {"type": "integer"}, "minItems": 100_000},
    "recursive": {
        "$defs": {
            "n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}
        },
        "$ref": "#/$defs/n",
    },
}


@pytest.mark.parametrize("schema", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_schemas_within_the_limits_stay_fast(
    tokenizer: Any, vocab: int, eos: int, schema: dict[str, Any]
) -> None:
    """Compiling and each step are bounded by llguidance's limits: either a
    quick 400 or a grammar whose steps cost milliseconds."""
    started = time.perf_counter()
    try:
        text = compiled(schema_format(schema, strict=False))
    except OpenAIError as e:
        assert e.status == 400 and e.param == "response_format"
        assert time.perf_counter() - started < 2.0
        return
    row = constraint(tokenizer, text, [eos], vocab)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        scores = torch.randn(1, vocab, generator=gen)
        apply(scores, [(0, row)])
        token = int(scores[0].argmax())
        row.accept(token)
        if token == eos:
            break
    assert time.perf_counter() - started < 2.0


def test_apply_costs_milliseconds_for_a_batch_of_16(tokenizer: Any, vocab: int, eos: int) -> None:
    """It runs every decode step: 16 rows, each somewhere in PERSON."""
    text = compiled(schema_format(PERSON))
    gen = torch.Generator().manual_seed(0)
    rows = [constraint(tokenizer, text, [eos], vocab) for _ in range(16)]
    apply(torch.zeros(16, vocab), list(enumerate(rows)))  # first-call imports
    times = []
    for _ in range(60):
        scores = torch.randn(16, vocab, generator=gen)
        started = time.perf_counter()
        apply(scores, list(enumerate(rows)))
        times.append(time.perf_counter() - started)
        for r, row in enumerate(rows):
            token = int(scores[r].argmax())
            if token == eos:
                rows[r] = constraint(tokenizer, text, [eos], vocab)
            else:
                row.accept(token)
    times.sort()
    median, p90 = times[len(times) // 2] * 1000, times[int(len(times) * 0.9)] * 1000
    print(f"\napply, 16 rows x {vocab}: median {median:.2f} ms, p90 {p90:.2f} ms per step")
    assert median < 50
