"""Hostile input to prompts and their rules: slow patterns, huge and broken
values, deep JSON, big files and big version histories (issue 18, items 1,
2, 5, 9 and 12 for prompts)."""

import io
import json
import re
import threading
import time
import tracemalloc

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from engines import curation, evaluation, rules
from workbench.actions import ActionError
from workbench.actions.prompts import save_prompt
from workbench.models import Prompt, PromptVersion

REDOS = {"name": "all a", "kind": "regex", "pattern": "^(a+)+$"}
# Catastrophic for the `regex` engine too (it optimises ^(a+)+$ away).
SLOW = {"name": "slow", "kind": "regex", "pattern": "^(a|aa)+$"}
ANSWER = "a" * 40 + "!"


# --- item 2: patterns run with a time limit -------------------------------------


@pytest.mark.parametrize("rule", [REDOS, SLOW])
def test_a_backtracking_pattern_fails_its_check_quickly(rule):
    [parsed] = rules.validate_rules([rule])
    start = time.monotonic()
    result = rules.outcome(parsed, ANSWER)
    assert time.monotonic() - start < 2
    assert result.passed is False
    assert not rules.check(parsed, ANSWER)
    assert rules.check_all([parsed], ANSWER) == {rule["name"]: False}


def test_a_pattern_that_runs_out_of_time_says_why():
    [slow] = rules.validate_rules([SLOW])
    start = time.monotonic()
    result = rules.outcome(slow, ANSWER, timeout=0.2)
    assert time.monotonic() - start < 2
    assert result == rules.Outcome(False, result.reason)
    assert "pattern took longer than 0.2 s on this answer" in result.reason


def test_a_slow_pattern_does_not_stop_other_threads():
    """`re` holds the GIL while it backtracks; the rule engine must not."""
    [slow] = rules.validate_rules([SLOW])
    ticks = 0
    done = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        rules.outcome(slow, ANSWER, timeout=0.5)
    finally:
        done.set()
        thread.join()
    assert ticks > 50  # the other thread ran during the 0.5 s match


def test_curation_and_evals_complete_with_a_slow_pattern():
    rule_list = rules.validate_rules([SLOW, {"name": "bang", "kind": "ends_with", "text": "!"}])
    start = time.monotonic()
    curated = curation.curate([ANSWER], rule_list, curation.CurationSettings(best_of=1))
    score = evaluation.score_example(ANSWER, rules=rule_list)
    assert time.monotonic() - start < 10
    assert "slow" in curated.failing and "took longer than" in curated.record["rule_errors"]["slow"]
    assert score.rules == {"slow": False, "bang": True} and score.all_rules is False
    assert "took longer than" in score.rule_errors["slow"]


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("(", "missing )"),
        ("a{100000}", "too large"),
        ("(?:a{1000}){1000}", "too large"),
        ("a{4294967294}", "too large"),
        ("x" * 1001, "limit is 1,000"),
    ],
)
def test_a_bad_or_explosive_pattern_is_refused_when_validated(pattern, problem):
    start = time.monotonic()
    with pytest.raises(rules.RulesError) as exc:
        rules.validate_rules([{"name": "p", "kind": "regex", "pattern": pattern}])
    assert time.monotonic() - start < 2
    assert 'rule 1 ("p"): ' in str(exc.value) and problem in str(exc.value)


def test_python_syntax_still_works():
    lookaround, backref = rules.validate_rules(
        [
            {"name": "no sorry", "kind": "regex", "pattern": r"^(?!.*sorry)"},
            {"name": "double", "kind": "regex", "pattern": r"\b(\w+) \1\b", "must_match": False},
        ]
    )
    assert rules.check(lookaround, "Fine.") and not rules.check(lookaround, "So sorry.")
    assert rules.check(backref, "one two") and not rules.check(backref, "the the end")


@pytest.mark.django_db
def test_the_rule_form_saves_a_slow_pattern_at_once_and_refuses_a_bad_one(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text").version.prompt
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    start = time.monotonic()
    r = alice_client.post(
        url, {"rule_name": "all a", "kind": "regex", "pattern": "^(a+)+$", "must_match": "on"}
    )
    page = alice_client.get(prompt.get_absolute_url())
    assert time.monotonic() - start < 5
    assert r.status_code == 302 and page.status_code == 200 and b"^(a+)+$" in page.content
    r = alice_client.post(url, {"rule_name": "huge", "kind": "regex", "pattern": "a{100000}"})
    assert r.status_code == 400 and "Rule “huge”: invalid regex".encode() in r.content
    assert prompt.latest.number == 2


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("post", "message"),
    [
        ({"rule_name": "n" * 201, "kind": "contains", "text": "x"}, "A rule name is at most 200 characters"),
        (
            {"rule_name": "long", "kind": "contains", "text": "x" * 10_001},
            "text is at most 10,000 characters",
        ),
        (
            {"rule_name": "long", "kind": "regex", "pattern": "x" * 1_001},
            "pattern is at most 1,000 characters",
        ),
        ({"rule_name": "big", "kind": "max_words", "n": "1" + "0" * 30}, "Enter at most 1,000,000,000"),
    ],
)
def test_the_rule_form_refuses_oversized_values(alice_client, alice, alice_project, post, message):
    prompt = save_prompt(alice_project, alice, "p", "Text").version.prompt
    r = alice_client.post(reverse("prompt_rules", args=[alice_project.slug, prompt.pk]), post)
    assert r.status_code == 400 and message.encode() in r.content
    assert prompt.latest.number == 1


@pytest.mark.django_db
def test_a_prompt_takes_at_most_100_rules(alice_client, alice, alice_project):
    many = [{"name": f"r{i}", "kind": "contains", "text": "x"} for i in range(101)]
    r = alice_client.post(
        reverse("prompt_create", args=[alice_project.slug]),
        {"name": "p", "text": "Text", "rules": json.dumps(many)},
    )
    assert r.status_code == 400 and b"101 rules; the limit is 100 rules per prompt version" in r.content
    prompt = save_prompt(alice_project, alice, "q", "Text", many[:100]).version.prompt
    r = alice_client.post(
        reverse("prompt_rules", args=[alice_project.slug, prompt.pk]),
        {"rule_name": "one more", "kind": "lowercase"},
    )
    assert r.status_code == 400 and b"the limit is 100 rules" in r.content
    assert Prompt.objects.count() == 1 and prompt.latest.number == 1


# --- item 9: lone surrogates are refused at input ------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("rule", "where"),
    [
        (
            {"name": "bad\ud800", "kind": "contains", "text": "x"},
            "name&#x27; contains a lone surrogate (\\ud800)",
        ),
        ({"name": "ok", "kind": "contains\udfff", "text": "x"}, "unknown kind"),
        ({"name": "ok", "kind": "contains", "text": "x\ud800"}, "text&#x27; contains a lone surrogate"),
        ({"name": "ok", "kind": "regex", "pattern": "\ud800"}, "pattern&#x27; contains a lone surrogate"),
        ({"name": "ok", "kind": "regex", "pattern": "x", "flags": ["\ud800"]}, "unknown flag"),
        ({"name": "ok", "kind": "lowercase", "\ud800": 1}, "invalid key"),
    ],
)
def test_lone_surrogates_in_rules_json_are_refused(alice_client, alice_project, rule, where):
    # json.dumps escapes the surrogate as \ud800, as a browser or a file would send it.
    r = alice_client.post(
        reverse("prompt_create", args=[alice_project.slug]),
        {"name": "p", "text": "Text", "rules": json.dumps([rule])},
    )
    assert r.status_code == 400 and where.encode() in r.content
    assert not Prompt.objects.exists()
    assert alice_client.get(reverse("prompt_list", args=[alice_project.slug])).status_code == 200


@pytest.mark.django_db
def test_lone_surrogates_from_a_rules_file_or_the_command_line_are_refused(alice, alice_project, tmp_path):
    prompt = tmp_path / "p.md"
    prompt.write_text("Text")
    rules_file = tmp_path / "rules.json"
    rules_file.write_text('[{"name": "x\\ud800", "kind": "lowercase"}]')
    with pytest.raises(CommandError, match="lone surrogate"):
        call_command(
            "import_prompt",
            str(prompt),
            "--project",
            alice_project.slug,
            "--name",
            "p",
            "--rules",
            str(rules_file),
        )
    # A command-line argument that is not UTF-8 arrives with surrogate escapes.
    with pytest.raises(CommandError, match="note contains a lone surrogate"):
        call_command(
            "import_prompt",
            str(prompt),
            "--project",
            alice_project.slug,
            "--name",
            "p",
            "--note",
            "caf\udce9",
        )
    with pytest.raises(ActionError, match="prompt text contains a lone surrogate"):
        save_prompt(alice_project, alice, "p", "x\ud800")
    assert not Prompt.objects.exists()


@pytest.mark.django_db
def test_the_prompt_page_renders_after_a_refused_surrogate_rule(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text").version.prompt
    r = alice_client.post(
        reverse("prompt_create", args=[alice_project.slug]),
        {
            "name": "p",
            "text": "Text 2",
            "version_of": prompt.pk,
            "rules": json.dumps([{"name": "\ud800", "kind": "lowercase"}]),
        },
    )
    assert r.status_code == 400
    assert PromptVersion.objects.count() == 1
    assert alice_client.get(prompt.get_absolute_url()).status_code == 200


# --- item 1: rules JSON nesting is bounded ---------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.django_db
def test_a_deeply_nested_rules_json_is_refused_quickly_in_the_form(alice_client, alice_project):
    url = reverse("prompt_create", args=[alice_project.slug])
    alice_client.get(reverse("prompt_list", args=[alice_project.slug]))  # load the templates first
    start = time.monotonic()
    r = alice_client.post(url, {"name": "p", "text": "Text", "rules": DEEP})
    elapsed = time.monotonic() - start
    assert r.status_code == 400 and b"Rules: line 1: JSON nested more than 32 levels deep" in r.content
    tracemalloc.start()
    alice_client.post(url, {"name": "p", "text": "Text", "rules": DEEP})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1 and peak < 100 * 2**20
    assert not Prompt.objects.exists()


@pytest.mark.django_db
def test_a_deeply_nested_rules_file_is_refused_by_the_command(alice_project, tmp_path):
    prompt = tmp_path / "p.md"
    prompt.write_text("Text")
    rules_file = tmp_path / "rules.json"
    rules_file.write_text("[\n" + DEEP)
    start = time.monotonic()
    with pytest.raises(CommandError, match=r"rules.json: line 2: JSON nested more than 32 levels deep"):
        call_command(
            "import_prompt",
            str(prompt),
            "--project",
            alice_project.slug,
            "--name",
            "p",
            "--rules",
            str(rules_file),
        )
    assert time.monotonic() - start < 1
    rules_file.write_text('[{"name": "n", "kind": "max_words", "n": ' + "9" * 5000 + "}]")
    with pytest.raises(CommandError, match="invalid JSON"):
        call_command(
            "import_prompt",
            str(prompt),
            "--project",
            alice_project.slug,
            "--name",
            "p",
            "--rules",
            str(rules_file),
        )
    assert not Prompt.objects.exists()


# --- item 5: a prompt file is read up to its limit only --------------------------


class CountingFile(io.BytesIO):
    """An upload that remembers how many bytes were asked of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


@pytest.mark.django_db
def test_a_prompt_file_over_the_limit_is_refused_without_reading_it_all(
    alice_client, alice_project, settings
):
    settings.PROMPT_MAX_CHARS = 1000
    settings.PROMPT_MAX_BYTES = 4003  # at most 4,003 bytes of UTF-8
    url = reverse("prompt_create", args=[alice_project.slug])
    # the upload handler stops the file at the byte past the limit
    r = alice_client.post(url, {"name": "big", "file": SimpleUploadedFile("big.md", b"x" * 50_000)})
    assert r.status_code == 413
    assert b"big.md is larger than the 3.9\xc2\xa0KB limit; the upload was stopped there" in r.content
    r = alice_client.post(url, {"name": "big", "file": SimpleUploadedFile("big.md", b"x" * 1001)})
    assert r.status_code == 400 and b"The prompt has 1,001 characters; the limit is 1,000." in r.content
    assert not Prompt.objects.exists()

    from workbench.actions.prompts import read_prompt_file

    upload = CountingFile(b"x" * 10_000_000)
    with pytest.raises(ActionError, match="larger than 4,003 bytes"):
        read_prompt_file(upload, "big.md")
    assert upload.bytes_read == 4004


@pytest.mark.django_db
def test_the_import_command_reads_a_prompt_file_up_to_its_limit(alice_project, tmp_path, settings):
    settings.PROMPT_MAX_CHARS = 1000
    settings.PROMPT_MAX_BYTES = 4003
    big = tmp_path / "big.md"
    big.write_bytes(b"x" * 100_000)
    with pytest.raises(CommandError, match="the file is larger than 4,003 bytes"):
        call_command("import_prompt", str(big), "--project", alice_project.slug, "--name", "p")
    assert not Prompt.objects.exists()


# --- item 12: lists of prompt versions never load their texts --------------------


def _selects_whole_text(sql: str) -> bool:
    """Whether the query reads the text column itself (not its length or a
    short prefix computed in the database)."""
    sql = re.sub(r"(?i)(SUBSTR(ING)?|LENGTH|CHAR_LENGTH)\(\s*[^()]*\)", "", sql)
    return bool(re.search(r'"workbench_promptversion"\."text"', sql))


@pytest.mark.django_db
def test_prompt_pages_do_not_load_every_versions_text(alice_client, alice, alice_project):
    texts = [f"Version {i}: " + chr(ord("a") + i % 26) * 1_000_000 for i in range(40)]
    rows = []
    prompt = Prompt.objects.create(project=alice_project, name="huge", created_by=alice)
    for number, text in enumerate(texts, start=1):
        rows.append(
            PromptVersion(prompt=prompt, number=number, text=text, sha256=f"{number:064d}", author=alice)
        )
    PromptVersion.objects.bulk_create(rows)
    for i in range(30):  # more prompts than one page holds
        save_prompt(alice_project, alice, f"small {i:02d}", f"Small prompt {i}.")

    list_url = reverse("prompt_list", args=[alice_project.slug])
    tracemalloc.start()
    with CaptureQueriesContext(connection) as queries:
        r = alice_client.get(list_url)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    body = r.content.decode()
    assert r.status_code == 200
    assert "huge" in body and f"{len(texts[-1]):,} characters" in body and "40 versions" in body
    assert "Version 39: nnnn" in body and "page 1 of 2" in body
    assert not [q["sql"] for q in queries if _selects_whole_text(q["sql"])]
    assert peak < 10 * 2**20, f"the list page allocated {peak / 2**20:.0f} MB"
    assert "small 29" in alice_client.get(list_url + "?page=2").content.decode()

    # The version page loads its own text, never the other 39.
    with CaptureQueriesContext(connection) as queries:
        r = alice_client.get(reverse("prompt_version", args=[alice_project.slug, prompt.pk, 3]))
    assert r.status_code == 200 and "v40" in r.content.decode()
    whole = [q["sql"] for q in queries if _selects_whole_text(q["sql"])]
    assert len(whole) == 1
    with CaptureQueriesContext(connection) as queries:
        r = alice_client.get(reverse("prompt_diff", args=[alice_project.slug, prompt.pk]) + "?a=1&b=2")
    assert r.status_code == 200
    assert len([q for q in queries if _selects_whole_text(q["sql"])]) == 2
