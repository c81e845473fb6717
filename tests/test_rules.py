import pytest

from engines.rules import (
    KINDS,
    Rule,
    RulesError,
    check,
    check_all,
    describe,
    rules_to_json,
    validate_rules,
)


def rule(kind: str, **params: object) -> Rule:
    return validate_rules([{"name": "r", "kind": kind, **params}])[0]


def problems(data: object) -> list[str]:
    with pytest.raises(RulesError) as info:
        validate_rules(data)
    return info.value.errors


@pytest.mark.parametrize(
    ("kind", "params", "passing", "failing"),
    [
        ("starts_with", {"text": "Ahoy"}, "  \nAhoy, matey", "Well, ahoy"),
        ("starts_with", {"text": "ahoy", "case_sensitive": False}, "AHOY there", "Hello"),
        ("starts_with", {"text": "Ahoy"}, "Ahoy", "ahoy, lowercase"),
        ("ends_with", {"text": "Arrr!"}, "Good day. Arrr!\n\n", "Arrr! Good day."),
        ("ends_with", {"text": "ARRR!", "case_sensitive": False}, "yes arrr!", "yes arr"),
        ("contains", {"text": "treasure"}, "the treasure map", "the Treasure map"),
        ("contains", {"text": "treasure", "case_sensitive": False}, "the TREASURE map", "the map"),
        ("not_contains", {"text": "As an AI"}, "Sure, here it is.", "As an AI, I cannot."),
        ("not_contains", {"text": "as an ai", "case_sensitive": False}, "Sure.", "AS AN AI I refuse"),
        ("regex", {"pattern": r"^Dear \w+,"}, "Dear Ann, hello", "Hi Ann"),
        ("regex", {"pattern": r"^dear", "flags": ["ignorecase", "multiline"]}, "x\nDEAR y", "x dear"),
        ("regex", {"pattern": r"a.b", "flags": ["dotall"]}, "a\nb", "ab"),
        ("regex", {"pattern": r"\bsorry\b", "must_match": False}, "Here you go.", "I am sorry."),
        ("max_words", {"n": 3}, " one two\nthree ", "one two three four"),
        ("lowercase", {}, "all lower case, 123 ünïcode", "Not lower"),
        ("no_list_markup", {}, "Plain prose.\n-5 degrees is cold.\n*emphasis*", "Steps:\n  - first"),
        ("no_list_markup", {}, "Version 2.0 is out.", "1. first\n2. second"),
        ("no_list_markup", {}, "a + b", "* star item"),
        ("no_list_markup", {}, "text", "3) third"),
        ("json_valid", {}, ' {"a": [1, 2]}\n', '{"a": 1,}'),
        ("json_valid", {}, "[]", "Here is JSON: {}"),
    ],
)
def test_it_checks_each_kind(kind, params, passing, failing):
    r = rule(kind, **params)
    assert check(r, passing) is True
    assert check(r, failing) is False


def test_it_checks_every_kind_in_the_metadata():
    samples = {"string": "x", "integer": 2, "boolean": True, "flags": ["ignorecase"]}
    for kind in KINDS.values():
        r = rule(kind.name, **{p.name: samples[p.type] for p in kind.params})
        assert isinstance(check(r, "x"), bool)


def test_it_describes_every_kind_with_help_text():
    assert list(KINDS) == [
        "starts_with",
        "ends_with",
        "contains",
        "not_contains",
        "regex",
        "max_words",
        "lowercase",
        "no_list_markup",
        "json_valid",
    ]
    for kind in KINDS.values():
        assert kind.help
        for param in kind.params:
            assert param.help and param.type in ("string", "integer", "boolean", "flags")
            assert param.required or param.default is not None


def test_it_checks_all_rules_by_name():
    rules = validate_rules(
        [
            {"name": "Greeting", "kind": "starts_with", "text": "Ahoy"},
            {"name": "Short", "kind": "max_words", "n": 2},
        ]
    )
    assert check_all(rules, "Ahoy there matey") == {"Greeting": True, "Short": False}
    assert check_all([], "anything") == {}


def test_it_fills_in_defaults_and_round_trips_through_json():
    data = [
        {"name": "Greeting", "kind": "starts_with", "text": "Ahoy"},
        {
            "name": "No sorry",
            "kind": "regex",
            "pattern": "sorry",
            "flags": ["ignorecase"],
            "must_match": False,
        },
        {"name": "Lower", "kind": "lowercase"},
    ]
    rules = validate_rules(data)
    assert rules[0].params == {"text": "Ahoy", "case_sensitive": True}
    assert rules[1].params == {"pattern": "sorry", "flags": ["ignorecase"], "must_match": False}
    out = rules_to_json(rules)
    assert out[0] == {"name": "Greeting", "kind": "starts_with", "text": "Ahoy", "case_sensitive": True}
    assert out[2] == {"name": "Lower", "kind": "lowercase"}
    assert validate_rules(out) == rules
    out[1]["flags"].append("dotall")
    assert rules[1].params["flags"] == ["ignorecase"]


def test_it_describes_rules_for_people():
    assert describe(rule("starts_with", text="Ahoy", case_sensitive=False)) == 'starts with "Ahoy" (any case)'
    assert describe(rule("regex", pattern="x+", flags=["ignorecase"], must_match=False)) == (
        "does not match /x+/ [ignorecase]"
    )
    assert describe(rule("max_words", n=50)) == "at most 50 words"
    assert describe(rule("json_valid")) == "valid JSON"


def test_it_requires_a_list_of_objects():
    assert problems({"name": "x"}) == ["rules must be a list, got object"]
    assert problems(["x", None]) == [
        "rule 1: expected an object with 'name' and 'kind', got string",
        "rule 2: expected an object with 'name' and 'kind', got null",
    ]


def test_it_reports_bad_names():
    assert problems(
        [
            {"kind": "lowercase"},
            {"name": 3, "kind": "lowercase"},
            {"name": " ", "kind": "lowercase"},
        ]
    ) == [
        "rule 1: missing 'name'",
        "rule 2: 'name' must be a string, got number",
        "rule 3: 'name' must not be empty",
    ]


def test_it_reports_duplicate_names():
    assert problems(
        [
            {"name": "Greeting", "kind": "lowercase"},
            {"name": "Other", "kind": "lowercase"},
            {"name": "Greeting", "kind": "json_valid"},
        ]
    ) == ['rule 3 ("Greeting"): duplicate name (rule 1 has the same name)']


def test_it_reports_bad_kinds():
    expected = ", ".join(KINDS)
    assert problems(
        [
            {"name": "Greeting"},
            {"name": "b", "kind": ["regex"]},
            {"kind": "startswith"},
            {"name": "d", "kind": "sentiment"},
        ]
    ) == [
        "rule 1 (\"Greeting\"): missing 'kind'",
        "rule 2 (\"b\"): 'kind' must be a string, got list",
        "rule 3: missing 'name'",
        f"rule 3: unknown kind 'startswith' (expected one of {expected}); did you mean 'starts_with'?",
        f"rule 4 (\"d\"): unknown kind 'sentiment' (expected one of {expected})",
    ]


def test_it_reports_missing_and_unknown_parameters():
    assert problems(
        [
            {"name": "Greeting", "kind": "starts_with"},
            {"name": "b", "kind": "contains", "txt": "x", "text": "y"},
            {"name": "c", "kind": "lowercase", "text": "x"},
            {"name": "d", "kind": "regex"},
        ]
    ) == [
        "rule 1 (\"Greeting\"): missing parameter 'text'",
        "rule 2 (\"b\"): unknown parameter 'txt' (kind 'contains' takes 'text', 'case_sensitive')",
        "rule 3 (\"c\"): unknown parameter 'text' (kind 'lowercase' takes no parameters)",
        "rule 4 (\"d\"): missing parameter 'pattern'",
    ]


def test_it_reports_parameters_of_the_wrong_type():
    assert problems(
        [
            {"name": "a", "kind": "starts_with", "text": 5},
            {"name": "b", "kind": "ends_with", "text": ""},
            {"name": "c", "kind": "contains", "text": "x", "case_sensitive": "no"},
            {"name": "d", "kind": "max_words", "n": "10"},
            {"name": "e", "kind": "max_words", "n": 0},
            {"name": "f", "kind": "max_words", "n": True},
            {"name": "g", "kind": "max_words", "n": 2.5},
            {"name": "h", "kind": "regex", "pattern": "x", "flags": "i"},
            {"name": "i", "kind": "regex", "pattern": "x", "flags": ["ignorecase", "x"]},
            {"name": "j", "kind": "regex", "pattern": "x", "must_match": 1},
        ]
    ) == [
        "rule 1 (\"a\"): parameter 'text' must be a string, got number",
        "rule 2 (\"b\"): parameter 'text' must not be empty",
        "rule 3 (\"c\"): parameter 'case_sensitive' must be true or false, got string",
        "rule 4 (\"d\"): parameter 'n' must be a positive integer, got string",
        "rule 5 (\"e\"): parameter 'n' must be a positive integer, got 0",
        "rule 6 (\"f\"): parameter 'n' must be a positive integer, got boolean",
        "rule 7 (\"g\"): parameter 'n' must be a positive integer, got number",
        "rule 8 (\"h\"): parameter 'flags' must be a list of flag names, got string",
        "rule 9 (\"i\"): parameter 'flags': unknown flag 'x' (expected ignorecase, multiline or dotall)",
        "rule 10 (\"j\"): parameter 'must_match' must be true or false, got number",
    ]


def test_it_reports_an_invalid_regex_with_the_regex_error():
    assert problems(
        [
            {"name": "Code", "kind": "regex", "pattern": "("},
            {"name": "Set", "kind": "regex", "pattern": "[a", "flags": ["ignorecase"]},
        ]
    ) == [
        "rule 1 (\"Code\"): invalid regex '(': missing ), unterminated subpattern at position 0",
        "rule 2 (\"Set\"): invalid regex '[a': unterminated character set at position 0",
    ]


def test_it_reports_every_problem_at_once():
    with pytest.raises(RulesError) as info:
        validate_rules(
            [
                {"name": "ok", "kind": "lowercase"},
                {"name": "bad", "kind": "max_words"},
                {"name": "ok", "kind": "nope"},
            ]
        )
    assert len(info.value.errors) == 3
    assert str(info.value).splitlines() == info.value.errors
