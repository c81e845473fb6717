"""Small things that cost trust (issue 23, item 9): the request-log switch
lives where logging is decided, rules are edited as one change, a rollback
on a gated alias is audited as gated, web messages never cite command
flags, the top navigation fits a phone, and a slow page shows it is coming."""

import io
import re
import shutil
import time
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse
from playwright.sync_api import expect

from serving.forms import GateForm
from serving.models import Alias, AliasMove
from tests.test_promotion import evaluated, gate
from tests.test_promotion import world as serving_world  # noqa: F401  (a fixture)
from tests.test_ui_walk import log_in, watch
from tests.test_ui_walk import world as ui_world  # noqa: F401  (a fixture)
from workbench.actions.prompts import save_prompt
from workbench.models import PromptVersion

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
FLAG = re.compile(r"--[a-z]")


def text_of(html: str) -> str:
    """The words a user reads in <main> (tags, scripts and styles left out)."""
    main = html[html.index("<main") : html.index("</main>")]
    main = re.sub(r"<(script|style|template)\b.*?</\1>", " ", main, flags=re.S)
    return re.sub(r"<[^>]+>", " ", main)


# --- the request log is its own setting, not part of the gate ------------------------------------


@pytest.mark.django_db
def test_it_keeps_the_request_log_switch_out_of_the_gate(serving_world, alice_client):  # noqa: F811
    slug, alias = serving_world["project"].slug, serving_world["alias"]
    assert "log_requests" not in GateForm(serving_world["project"]).fields
    page = alice_client.get(reverse("serving_alias", args=[slug, "production"])).content.decode()
    gate_form = page[page.index('action="' + reverse("serving_alias_gate", args=[slug, "production"])) :]
    gate_form = gate_form[: gate_form.index("</form>")]
    assert "log_requests" not in gate_form
    assert 'id="request-log"' in page and "Keep a log of this alias&#x27;s requests" in page

    url = reverse("serving_alias_logging", args=[slug, "production"])
    r = alice_client.post(url, {"log_requests": "on"}, follow=True)
    assert r.redirect_chain[-1][0].endswith("#request-log")
    assert "now keeps a log of its requests" in r.content.decode()
    assert Alias.objects.get(pk=alias.pk).log_requests
    # Saving the gate leaves the log as it is (the gate form has no say in it).
    r = alice_client.post(
        reverse("serving_alias_gate", args=[slug, "production"]),
        {"gating_suite": serving_world["suite"].pk, "min_all_rules": "0.5", "log_requests": ""},
    )
    assert r.status_code == 302 and Alias.objects.get(pk=alias.pk).log_requests
    # The request log page says which aliases log and links to each one's setting.
    log_page = alice_client.get(reverse("request_log", args=[slug])).content.decode()
    assert f"{reverse('serving_alias', args=[slug, 'production'])}#request-log" in log_page
    r = alice_client.post(url, {})
    assert r.status_code == 302 and not Alias.objects.get(pk=alias.pk).log_requests
    assert alice_client.get(url).status_code == 405


@pytest.mark.django_db
def test_another_team_cannot_switch_the_request_log(serving_world, bob, client):  # noqa: F811
    client.force_login(bob)
    url = reverse("serving_alias_logging", args=[serving_world["project"].slug, "production"])
    assert client.post(url, {"log_requests": "on"}).status_code == 404
    assert not Alias.objects.get(pk=serving_world["alias"].pk).log_requests


# --- a rollback on a gated alias is audited as gated --------------------------------------------


@pytest.mark.django_db
def test_a_rollback_on_a_gated_alias_keeps_the_gate_verdict_on_its_target(
    serving_world,  # noqa: F811
    alice_client,
):
    w, slug = serving_world, serving_world["project"].slug
    alias = gate(w, all_rules=0.8)
    evaluated(w, w["a"], 0.9)
    evaluated(w, w["b"], 0.95)
    url = reverse("serving_alias_rollback", args=[slug, "production"])
    for v in (w["a"], w["b"]):
        r = alice_client.post(
            reverse("serving_promote", args=[slug]), {"alias": "production", "variant": v.pk}
        )
        assert r.status_code == 302
    # a's run falls below the bar: the rollback still goes (it is the way out), and says so.
    gate(w, all_rules=0.92)
    r = alice_client.post(url, {"reason": "b is rude"}, follow=True)
    move = AliasMove.objects.filter(alias=alias).first()
    assert move is not None and move.action == AliasMove.ROLLBACK and move.to_variant == w["a"]
    assert move.gated and move.verdict["rollback"] and move.verdict["passed"] is False
    assert move.verdict["suite"] == "held out"
    body = r.content.decode()
    assert "would refuse" in body and "0.900 &lt; minimum 0.920" in body
    history = body[body.index('id="moves"') :]
    assert "gated: the target fails on held out" in history and "A rollback is never blocked" in history
    # Forward again to b, which passes.
    alice_client.post(url)
    move = AliasMove.objects.filter(alias=alias).first()
    assert move.to_variant == w["b"] and move.gated and move.verdict["passed"] is True
    page = alice_client.get(reverse("serving_alias", args=[slug, "production"])).content.decode()
    assert "gated: the target passes on held out" in page


@pytest.mark.django_db
def test_a_rollback_on_an_alias_without_a_gate_says_not_gated(serving_world, alice_client):  # noqa: F811
    w, slug = serving_world, serving_world["project"].slug
    for v in (w["a"], w["b"]):
        alice_client.post(reverse("serving_promote", args=[slug]), {"alias": "production", "variant": v.pk})
    alice_client.post(reverse("serving_alias_rollback", args=[slug, "production"]))
    move = AliasMove.objects.first()
    assert move.action == AliasMove.ROLLBACK and move.verdict == {} and not move.gated
    page = alice_client.get(reverse("serving_alias", args=[slug, "production"])).content.decode()
    row = page[page.index('id="moves"') :].split("</tr>")[1]
    assert "rollback" in row and "not gated" in row


# --- rules edited as one change -------------------------------------------------------------------


def editor_post(rows: list[dict[str, object]], base: int, initial: int) -> dict[str, object]:
    data: dict[str, object] = {
        "rules-TOTAL_FORMS": str(len(rows)),
        "rules-INITIAL_FORMS": str(initial),
        "base": str(base),
    }
    for i, row in enumerate(rows):
        data.update({f"rules-{i}-{k}": v for k, v in row.items()})
    return data


RULES = [
    {"name": "greeting", "kind": "starts_with", "text": "Hello", "case_sensitive": True},
    {"name": "brief", "kind": "max_words", "n": 120},
]


@pytest.mark.django_db
def test_one_save_of_the_rules_editor_is_one_version(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text", RULES).version.prompt
    page = alice_client.get(prompt.get_absolute_url()).content.decode()
    assert 'name="rules-TOTAL_FORMS" value="3"' in page and 'name="rules-1-n"' in page
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    rows = [
        {"rule_name": "greeting", "kind": "starts_with", "text": "Hi", "case_sensitive": "on"},  # changed
        {"rule_name": "brief", "kind": "max_words", "n": "120", "DELETE": "on"},  # removed
        {"rule_name": "json", "kind": "json_valid"},  # added
        {"rule_name": "polite", "kind": "not_contains", "text": "stupid"},  # added
        {"rule_name": "", "kind": ""},  # an empty new row: ignored
    ]
    r = alice_client.post(url, editor_post(rows, base=1, initial=2))
    assert r.status_code == 302
    assert prompt.versions.count() == 2
    latest = prompt.latest
    assert [x["name"] for x in latest.rules] == ["greeting", "json", "polite"]
    assert latest.rules[0]["text"] == "Hi" and latest.text == "Text"
    assert latest.note == "removed rule brief; changed rule greeting; added rule json; added rule polite"
    # Saving the same rows again stores nothing.
    same = [
        {"rule_name": "greeting", "kind": "starts_with", "text": "Hi", "case_sensitive": "on"},
        {"rule_name": "json", "kind": "json_valid"},
        {"rule_name": "polite", "kind": "not_contains", "text": "stupid"},  # left unticked, as saved
    ]
    r = alice_client.post(url, editor_post(same, base=2, initial=3), follow=True)
    assert b"The rules are unchanged: no new version." in r.content and prompt.versions.count() == 2


@pytest.mark.django_db
def test_a_bad_row_is_a_form_error_and_nothing_is_saved(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text", RULES).version.prompt
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    rows = [
        {"rule_name": "greeting", "kind": "starts_with", "text": "Hello", "case_sensitive": "on"},
        {"rule_name": "brief", "kind": "max_words", "n": "120"},
        {"rule_name": "dear", "kind": "regex", "pattern": "(Dear", "flags": ["multiline"]},
        {"rule_name": "slow", "kind": "regex", "pattern": "a{100000}"},
    ]
    r = alice_client.post(url, editor_post(rows, base=1, initial=2))
    body = r.content.decode()
    assert (
        r.status_code == 400 and "Rule “dear”: invalid regex" in body and "Rule “slow”: invalid regex" in body
    )
    assert 'value="(Dear"' in body and 'value="multiline" checked' in body  # what was typed stays
    # Two rows with one name: the rule validator's message, naming both.
    rows = [*rows[:2], {"rule_name": "brief", "kind": "lowercase"}]
    r = alice_client.post(url, editor_post(rows, base=1, initial=2))
    assert r.status_code == 400 and "duplicate name (rule 2 has the same name)" in r.content.decode()
    assert prompt.versions.count() == 1


@pytest.mark.django_db
def test_the_editor_refuses_to_overwrite_a_newer_version(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text", RULES).version.prompt
    save_prompt(alice_project, alice, "p", "Text, edited meanwhile")
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    rows = [{"rule_name": "json", "kind": "json_valid"}]
    r = alice_client.post(url, editor_post(rows, base=1, initial=0))
    assert r.status_code == 409 and "saved as version 2 since you opened version 1" in r.content.decode()
    assert prompt.versions.count() == 2 and prompt.latest.rules == PromptVersion.objects.get(number=1).rules


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("post", "message"),
    [
        ({"rules-TOTAL_FORMS": "1000000", "rules-INITIAL_FORMS": "0", "base": "1"}, "at most 100 rules"),
        ({"rules-TOTAL_FORMS": "x", "rules-INITIAL_FORMS": "0", "base": "1"}, "rules form was incomplete"),
        ({"rules-TOTAL_FORMS": "0", "rules-INITIAL_FORMS": "0", "base": "nope"}, "rules form was incomplete"),
    ],
)
def test_a_tampered_editor_post_is_a_clear_400(alice_client, alice, alice_project, post, message):
    prompt = save_prompt(alice_project, alice, "p", "Text", RULES).version.prompt
    r = alice_client.post(reverse("prompt_rules", args=[alice_project.slug, prompt.pk]), post)
    assert r.status_code == 400 and message in r.content.decode()
    assert prompt.versions.count() == 1


@pytest.mark.django_db
def test_another_team_cannot_edit_the_rules(alice, alice_project, bob, client):
    prompt = save_prompt(alice_project, alice, "p", "Text", RULES).version.prompt
    client.force_login(bob)
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    r = client.post(url, editor_post([{"rule_name": "x", "kind": "lowercase"}], base=1, initial=0))
    assert r.status_code == 404 and prompt.versions.count() == 1


@pytest.mark.django_db
def test_the_kind_parameters_come_with_the_row_names(alice_client, alice_project):
    url = reverse("rule_params", args=[alice_project.slug])
    body = alice_client.get(url, {"prefix": "rules-3", "rules-3-kind": "regex"}).content.decode()
    assert 'name="rules-3-pattern"' in body and 'name="rules-3-flags" value="dotall"' in body
    body = alice_client.get(url, {"prefix": "<b>", "kind": "max_words"}).content.decode()
    assert 'name="n"' in body and "<b>" not in body


# --- no command flags in web messages -------------------------------------------------------------


def upload(client, project, name: str, content: bytes, **fields: object):
    body = {"file": SimpleUploadedFile(name, content), "name": "ds", "eval_percent": 0, "seed": 0, **fields}
    return client.post(reverse("dataset_upload", args=[project.slug]), body)


UPLOAD_CASES = [
    ("single_object.json", (FIXTURES / "single_object.json").read_bytes(), {}, "records key"),
    ("dpo.jsonl", (FIXTURES / "dpo.jsonl").read_bytes(), {}, "use only the chosen answers"),
    ("gsm8k.jsonl", (FIXTURES / "gsm8k.jsonl").read_bytes(), {"format": "chat"}, "query column"),
    ("t.csv", b"id,text,label\n1,hi,x\n", {"query_column": "question"}, "query column"),
    ("t.csv", b"a,b\n1,2\n", {}, "as the query column"),
    ("q.txt", b"q\nhello\n", {"format": "fields"}, "Query column"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "content", "fields", "names"), UPLOAD_CASES, ids=lambda c: str(c)[:20])
def test_the_upload_page_names_settings_never_command_flags(
    alice_client, alice_project, settings, tmp_path, name, content, fields, names
):
    settings.MEDIA_ROOT = tmp_path
    r = upload(alice_client, alice_project, name, content, **fields)
    text = text_of(r.content.decode())
    assert r.status_code == 400 and names in text, text
    assert not FLAG.search(text), FLAG.search(text)


@pytest.mark.django_db
def test_the_upload_page_warning_names_no_flag(alice_client, alice_project, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    r = upload(
        alice_client, alice_project, "x.jsonl", (FIXTURES / "extra_fields.jsonl").read_bytes(), format="lines"
    )
    assert r.status_code == 302
    text = text_of(alice_client.get(r.url).content.decode())
    assert "stored as raw JSON text" in text and not FLAG.search(text)


@pytest.mark.django_db
def test_the_command_line_adds_the_flag_for_the_setting_named(alice_project, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    path = tmp_path / "single_object.json"
    shutil.copy(FIXTURES / "single_object.json", path)
    err = io.StringIO()
    with pytest.raises(SystemExit):
        call_command("import_dataset", str(path), "--project", alice_project.slug, "--name", "x", stderr=err)
    assert 'load it with records key "data"' in err.getvalue()
    assert "On the command line, records key: --records-key KEY." in err.getvalue()


# --- the browser: a phone-sized screen, the rules editor, a slow page -----------------------------


def no_sideways_scroll(page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    wide = page.evaluate(
        """() => [...document.querySelectorAll("body *")]
            .filter(e => e.getBoundingClientRect().right > 390.5)
            .map(e => e.tagName + "." + e.className + "#" + e.id + " " + Math.round(e.getBoundingClientRect().right))
            .slice(0, 6)"""
    )
    assert width <= 390, f"{page.url}: {width}px wide; the widest: {wide}"


def test_the_top_navigation_fits_a_phone(page, ui_world):  # noqa: F811
    w, slug = ui_world, ui_world["project"].slug
    problems = watch(page)
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page)
    urls = [
        reverse("project_list"),
        reverse("project_detail", args=[slug]),
        reverse("prompt_list", args=[slug]),
        w["prompt"].get_absolute_url(),
        reverse("dataset_list", args=[slug]),
        w["upload"].get_absolute_url(),
        reverse("job_list", args=[slug]),
        reverse("evals_home", args=[slug]),
        w["comparison"].get_absolute_url(),
        reverse("serving_home", args=[slug]),
        reverse("serving_alias", args=[slug, "production"]),
        reverse("request_log", args=[slug]),
        reverse("playground", args=[slug]),
        reverse("models"),
    ]
    menu = page.get_by_role("button", name="Menu")
    for url in urls:
        page.goto(url)
        page.wait_for_load_state("networkidle")
        no_sideways_scroll(page)
        expect(page.locator("#mainnav")).to_be_hidden()
    page.goto(reverse("project_detail", args=[slug]))
    page.wait_for_load_state("networkidle")
    menu.click()
    expect(menu).to_have_attribute("aria-expanded", "true")
    nav = page.locator("#mainnav")
    expect(nav).to_be_visible()
    no_sideways_scroll(page)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "nav-390.png"))
    nav.get_by_role("link", name="Datasets").click()
    expect(page.get_by_role("heading", name="Datasets", exact=True)).to_be_visible()
    no_sideways_scroll(page)
    # Wide again: the full navigation, no Menu button.
    page.set_viewport_size({"width": 1280, "height": 900})
    expect(page.locator("#mainnav")).to_be_visible()
    expect(menu).to_be_hidden()
    assert problems == []


def test_rules_are_added_changed_and_removed_with_one_save(page, alice, alice_project, live_server):
    prompt = save_prompt(
        alice_project, alice, "support", "You are Nova. Start with Hello.", RULES
    ).version.prompt
    problems = watch(page)
    log_in(page)
    page.goto(prompt.get_absolute_url())
    editor = page.locator("#rules-form")
    rows = editor.locator("fieldset.rule-edit")
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator("summary")).to_have_text('starts with "Hello"')  # the saved rule, folded
    rows.nth(0).locator("summary").click()
    rows.nth(0).locator("input[name='rules-0-text']").fill("Hi")
    rows.nth(1).get_by_label("Remove this rule").check()
    rows.nth(2).get_by_label("Rule name").fill("polite")
    rows.nth(2).get_by_label("Kind").select_option("not_contains")
    rows.nth(2).locator("input[name='rules-2-text']").fill("stupid")
    editor.get_by_role("button", name="+ Another rule").click()
    expect(rows).to_have_count(4)
    rows.nth(3).get_by_label("Rule name").fill("dear")
    rows.nth(3).get_by_label("Kind").select_option("regex")
    rows.nth(3).locator("input[name='rules-3-pattern']").fill("^Dear \\w+,")
    rows.nth(3).get_by_label("multiline").check()
    page.screenshot(path=str(SCREENSHOTS / "rules-edit.png"), full_page=True)
    editor.get_by_role("button", name="Save rules").click()
    expect(page.get_by_role("status").filter(has_text="Rules saved as version 2")).to_be_visible()
    assert prompt.versions.count() == 2
    assert [r["name"] for r in prompt.latest.rules] == ["greeting", "polite", "dear"]
    assert prompt.latest.rules[2]["flags"] == ["multiline"] and prompt.latest.rules[0]["text"] == "Hi"
    expect(page.locator("#rules-form fieldset.rule-edit")).to_have_count(4)  # three rules and a new row
    assert problems == []


def test_a_slow_page_shows_that_it_is_coming(page, alice, alice_project, live_server, monkeypatch):
    from workbench.views import prompts as prompt_views

    prompt = save_prompt(alice_project, alice, "support", "You are Nova.").version.prompt
    costs = prompt_views.token_costs

    def slow(version):  # a first tokenizer load of a large model, made long
        time.sleep(2.5)
        return costs(version)

    monkeypatch.setattr(prompt_views, "token_costs", slow)
    log_in(page)
    page.goto(reverse("prompt_list", args=[alice_project.slug]))
    bar = page.locator("#page-progress")
    expect(bar).to_be_hidden()
    # Clicked from the page, which reports the bar showing before the next page replaces it.
    shown_after = page.evaluate(
        """link => new Promise(resolve => {
            const bar = document.getElementById("page-progress"), start = performance.now();
            new MutationObserver(() => { if (!bar.hidden) resolve(performance.now() - start); })
                .observe(bar, {attributes: true});
            document.querySelector(`main a[href="${link}"]`).click();
        })""",
        prompt.get_absolute_url(),
    )
    assert 300 < shown_after < 2000
    expect(page.get_by_role("heading", name="support")).to_be_visible(timeout=10_000)
    expect(page.locator("#page-progress")).to_be_hidden()
