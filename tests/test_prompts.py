import json
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse

from tests.threads import run_together
from workbench.actions import ActionError
from workbench.actions.prompts import (
    PromptNameTaken,
    add_rule,
    create_prompt,
    diff_versions,
    remove_rule,
    restore_version,
    rule_changes,
    save_prompt,
    token_costs,
)
from workbench.models import FoundationModel, Prompt, PromptVersion

pytestmark = pytest.mark.django_db

RULES = [
    {"name": "greeting", "kind": "starts_with", "text": "Hello"},
    {"name": "short", "kind": "max_words", "n": 80},
]


def test_it_versions_every_save(alice, alice_project):
    v1 = save_prompt(alice_project, alice, "support", "Be kind.").version
    v2 = save_prompt(alice_project, alice, "support", "Be kind and brief.").version
    assert (v1.number, v2.number) == (1, 2)
    import hashlib

    assert v1.sha256 == hashlib.sha256(b"Be kind.").hexdigest()
    assert Prompt.objects.get().latest == v2


def test_it_does_not_store_an_identical_save(alice, alice_project):
    save_prompt(alice_project, alice, "support", "Same.")
    saved = save_prompt(alice_project, alice, "support", "Same.")
    assert not saved.created and PromptVersion.objects.count() == 1


def test_it_stores_rules_with_the_version_and_carries_them_over(alice, alice_project):
    v1 = save_prompt(alice_project, alice, "support", "Text", RULES).version
    v2 = save_prompt(alice_project, alice, "support", "Text 2").version
    assert v1.rules[0] == {"name": "greeting", "kind": "starts_with", "text": "Hello", "case_sensitive": True}
    assert v2.rules == v1.rules


def test_it_rejects_bad_rules_with_every_problem(alice, alice_project):
    with pytest.raises(ActionError) as exc:
        save_prompt(
            alice_project,
            alice,
            "support",
            "Text",
            [{"name": "a", "kind": "startswith"}, {"name": "b", "kind": "max_words"}],
        )
    assert "unknown kind 'startswith'" in str(exc.value) and "'n'" in str(exc.value)
    assert not Prompt.objects.exists()  # all or nothing


def test_it_rejects_an_empty_or_too_long_prompt(alice, alice_project, settings):
    with pytest.raises(ActionError, match="empty"):
        save_prompt(alice_project, alice, "p", "   ")
    settings.PROMPT_MAX_CHARS = 10
    with pytest.raises(ActionError, match="limit is 10"):
        save_prompt(alice_project, alice, "p", "x" * 11)


def test_it_takes_a_large_uploaded_prompt(alice_client, alice_project):
    text = "Rule: always be precise about refund windows and order numbers.\n" * 800  # ~52k chars
    upload = SimpleUploadedFile("prompt.md", text.encode(), content_type="text/markdown")
    r = alice_client.post(
        reverse("prompt_create", args=[alice_project.slug]), {"name": "big", "file": upload}
    )
    assert r.status_code == 302
    assert PromptVersion.objects.get().text == text


def test_it_refuses_a_prompt_file_that_is_not_utf8(alice_client, alice_project):
    upload = SimpleUploadedFile("p.txt", b"ok\ncaf\xe9\n")
    r = alice_client.post(
        reverse("prompt_create", args=[alice_project.slug]), {"name": "p", "file": upload}, follow=True
    )
    assert b"not valid UTF-8 on line 2" in r.content
    assert not Prompt.objects.exists()


def test_it_shows_token_costs_under_each_base_model(alice_client, alice, alice_project, tiny_model_dir):
    FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    prompt = save_prompt(
        alice_project, alice, "pirate", "You are a pirate. Always start with Arrr!"
    ).version.prompt
    r = alice_client.get(reverse("prompt_detail", args=[alice_project.slug, prompt.pk]))
    costs = r.context["costs"]
    assert costs[0]["model"].name == "tiny"
    assert 8 < costs[0]["text"] < 20
    # the template replaces SmolLM2's default system message, so the cost is
    # the prompt's tokens plus its framing minus that default
    assert costs[0]["per_request"] != costs[0]["text"]


def test_it_edits_rules_in_the_ui(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text").version.prompt
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    alice_client.post(url, {"rule_name": "hi", "kind": "starts_with", "text": "Hi", "case_sensitive": "on"})
    alice_client.post(url, {"rule_name": "json", "kind": "json_valid"})
    assert [r["name"] for r in prompt.latest.rules] == ["hi", "json"] and prompt.latest.number == 3
    r = alice_client.post(url, {"rule_name": "bad", "kind": "regex", "pattern": "("}, follow=True)
    # The pattern is compiled when the rule is saved: a form error on the field, naming the rule.
    assert r.status_code == 400 and "Rule “bad”: invalid regex".encode() in r.content
    assert prompt.latest.number == 3
    alice_client.post(reverse("prompt_rule_remove", args=[alice_project.slug, prompt.pk]), {"name": "hi"})
    assert [r["name"] for r in prompt.latest.rules] == ["json"]
    fields = alice_client.get(reverse("rule_params", args=[alice_project.slug]) + "?kind=regex")
    assert b'name="pattern"' in fields.content and b'value="ignorecase"' in fields.content


def test_it_diffs_two_versions(alice_client, alice, alice_project):
    save_prompt(alice_project, alice, "p", "line one\nline two\n")
    prompt = save_prompt(alice_project, alice, "p", "line one\nline 2\n").version.prompt
    r = alice_client.get(reverse("prompt_diff", args=[alice_project.slug, prompt.pk]) + "?a=1&b=2")
    assert ("del", "-line two") in r.context["diff"].lines and ("add", "+line 2") in r.context["diff"].lines


def test_a_non_member_cannot_see_or_fetch_a_prompt(client, bob, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "secret", "The secret text").version.prompt
    client.force_login(bob)
    slug = alice_project.slug
    for url in [
        reverse("prompt_list", args=[slug]),
        reverse("prompt_detail", args=[slug, prompt.pk]),
        reverse("prompt_version", args=[slug, prompt.pk, 1]),
        reverse("prompt_diff", args=[slug, prompt.pk]),
    ]:
        assert client.get(url).status_code == 404, url
    assert client.post(reverse("prompt_save", args=[slug, prompt.pk]), {"text": "x"}).status_code == 404


def test_a_prompt_id_from_another_project_is_404(alice_client, alice, alice_project, bob, bob_project):
    other = save_prompt(bob_project, bob, "theirs", "Bob's text").version.prompt
    r = alice_client.get(reverse("prompt_detail", args=[alice_project.slug, other.pk]))
    assert r.status_code == 404


def test_the_import_prompt_command(alice_project, tmp_path, capsys):
    f = tmp_path / "prompt.md"
    f.write_text("You are helpful.")
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    call_command(
        "import_prompt", str(f), "--project", alice_project.slug, "--name", "sp", "--rules", str(rules)
    )
    assert "stored as version 1" in capsys.readouterr().out
    f.write_text("You are very helpful.")
    call_command("import_prompt", str(f), "--project", alice_project.slug, "--name", "sp")
    latest = Prompt.objects.get(name="sp").latest
    assert latest.number == 2 and len(latest.rules) == 2
    rules.write_text('[{"name": "x", "kind": "max_words", "n": -1}]')
    with pytest.raises(CommandError, match="rule 1"):
        call_command(
            "import_prompt", str(f), "--project", alice_project.slug, "--name", "sp", "--rules", str(rules)
        )
    rules.write_text('[{"name": }]')
    with pytest.raises(CommandError, match="line 1: invalid JSON"):
        call_command(
            "import_prompt", str(f), "--project", alice_project.slug, "--name", "sp", "--rules", str(rules)
        )
    with pytest.raises(CommandError, match="No project 'nope'"):
        call_command("import_prompt", str(f), "--project", "nope", "--name", "sp")
    assert Prompt.objects.get(name="sp").latest.number == 2


# --- rules, diffs and forms through the actions ---------------------------------


def test_it_adds_and_removes_rules_through_the_action(alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text", RULES[:1]).version.prompt
    saved = add_rule(prompt, alice, {"name": "short", "kind": "max_words", "n": 5})
    assert saved.created and saved.version.number == 2 and saved.version.text == "Text"
    assert [r["name"] for r in saved.version.rules] == ["greeting", "short"]
    assert saved.version.note == "added rule short"
    saved = remove_rule(prompt, alice, "greeting")
    assert saved.version.number == 3 and [r["name"] for r in saved.version.rules] == ["short"]
    assert saved.version.note == "removed rule greeting"


def test_it_refuses_a_bad_rule_and_an_unknown_name_without_a_new_version(alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text", RULES).version.prompt
    with pytest.raises(ActionError, match=r'rule 3 \("greeting"\): duplicate name'):
        add_rule(prompt, alice, {"name": "greeting", "kind": "lowercase"})
    with pytest.raises(ActionError, match="missing parameter 'text'"):
        add_rule(prompt, alice, {"name": "x", "kind": "contains"})
    with pytest.raises(ActionError, match="no rule named 'nope'"):
        remove_rule(prompt, alice, "nope")
    assert prompt.versions.count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_rule_edits_at_once_keep_both_rules(alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text").version.prompt
    run_together(
        lambda: add_rule(prompt, alice, {"name": "a", "kind": "lowercase"}),
        lambda: add_rule(prompt, alice, {"name": "b", "kind": "json_valid"}),
    )
    latest = prompt.latest
    assert latest.number == 3 and sorted(r["name"] for r in latest.rules) == ["a", "b"]


def test_it_builds_the_diff_in_the_action(alice, alice_project):
    v1 = save_prompt(alice_project, alice, "p", "same\nold\n", RULES).version
    v2 = save_prompt(alice_project, alice, "p", "same\nnew\n", RULES[:1]).version
    diff = diff_versions(v1, v2)
    assert diff.lines == [
        ("meta", "--- version 1"),
        ("meta", "+++ version 2"),
        ("meta", "@@ -1,2 +1,2 @@"),
        ("ctx", " same"),
        ("del", "-old"),
        ("add", "+new"),
    ]
    assert (
        diff.rules_changed and not diff_versions(v2, v2).rules_changed and diff_versions(v2, v2).lines == []
    )


def test_the_diff_page_falls_back_to_the_latest_two_on_a_bad_number(alice_client, alice, alice_project):
    save_prompt(alice_project, alice, "p", "one")
    save_prompt(alice_project, alice, "p", "two")
    prompt = save_prompt(alice_project, alice, "p", "three").version.prompt
    r = alice_client.get(reverse("prompt_diff", args=[alice_project.slug, prompt.pk]) + "?a=abc&b=-1")
    assert r.status_code == 200 and (r.context["diff"].a.number, r.context["diff"].b.number) == (2, 3)
    r = alice_client.get(reverse("prompt_diff", args=[alice_project.slug, prompt.pk]) + "?a=1&b=9")
    assert r.status_code == 404


def test_a_bad_rule_shows_the_form_again_with_what_was_typed(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text").version.prompt
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    r = alice_client.post(
        url, {"rule_name": "dear", "kind": "regex", "pattern": "(Dear", "flags": ["multiline"]}
    )
    body = r.content.decode()
    assert r.status_code == 400 and "invalid regex" in body
    assert 'value="dear"' in body and '<option value="regex" selected>' in body and 'value="(Dear"' in body
    assert 'value="multiline" checked' in body and 'value="ignorecase" checked' not in body
    r = alice_client.post(url, {"rule_name": "short", "kind": "max_words", "n": "ten"})
    body = r.content.decode()
    assert r.status_code == 400 and "n: Enter a positive whole number." in body and 'value="ten"' in body
    r = alice_client.post(url, {"rule_name": "", "kind": "nope"})
    assert r.status_code == 400 and b"A rule needs a name." in r.content
    assert prompt.versions.count() == 1


def test_the_rule_form_types_the_parameters(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text").version.prompt
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    alice_client.post(url, {"rule_name": "short", "kind": "max_words", "n": "12"})
    alice_client.post(url, {"rule_name": "hi", "kind": "starts_with", "text": "Hi"})  # checkbox left unticked
    alice_client.post(
        url,
        {
            "rule_name": "re",
            "kind": "regex",
            "pattern": "x",
            "flags": ["dotall", "multiline"],
            "must_match": "on",
        },
    )
    assert prompt.latest.rules == [
        {"name": "short", "kind": "max_words", "n": 12},
        {"name": "hi", "kind": "starts_with", "text": "Hi", "case_sensitive": False},
        {"name": "re", "kind": "regex", "pattern": "x", "flags": ["dotall", "multiline"], "must_match": True},
    ]


def test_a_prompt_form_with_errors_keeps_what_was_typed(alice_client, alice, alice_project):
    url = reverse("prompt_create", args=[alice_project.slug])
    r = alice_client.post(url, {"name": "support", "text": "Be kind.", "rules": '[{"name": }]', "note": "n1"})
    body = r.content.decode()
    assert r.status_code == 400 and "Rules: line 1: invalid JSON" in body
    assert (
        'value="support"' in body
        and ">Be kind.</textarea>" in body
        and "[{&quot;name&quot;: }]</textarea>" in body
    )
    assert 'name="note" maxlength="300" placeholder="Where this prompt comes from" value="n1"' in body
    r = alice_client.post(url, {"name": "support", "text": "  "})
    assert r.status_code == 400 and b"The prompt text is empty." in r.content
    assert not Prompt.objects.exists()
    prompt = save_prompt(alice_project, alice, "support", "Be kind.").version.prompt
    r = alice_client.post(
        reverse("prompt_save", args=[alice_project.slug, prompt.pk]),
        {"text": "x" * 20, "note": "longer"},
        follow=True,
    )
    assert prompt.latest.number == 2
    r = alice_client.post(
        reverse("prompt_save", args=[alice_project.slug, prompt.pk]), {"text": "", "note": "typed note"}
    )
    body = r.content.decode()
    assert r.status_code == 400 and "The prompt text is empty." in body and 'value="typed note"' in body
    assert prompt.latest.number == 2


# --- a new user's first hour ------------------------------------------------------

THIRTY_LINES = "".join(
    f"{i}. Cite the order number and answer in the customer's language.\n" for i in range(1, 31)
)


def test_it_refuses_a_new_prompt_under_a_taken_name(alice_client, alice, alice_project):
    v1 = save_prompt(alice_project, alice, "support", THIRTY_LINES, RULES).version
    url = reverse("prompt_create", args=[alice_project.slug])
    r = alice_client.post(url, {"name": " support ", "text": "Be nice.", "rules": ""})
    body = r.content.decode()
    assert r.status_code == 400 and "A prompt named “support” already exists" in body
    assert f'href="{v1.prompt.get_absolute_url()}"' in body and ">Be nice.</textarea>" in body
    assert f'name="version_of" value="{v1.prompt.pk}"' in body and "It keeps its 2 rules." in body
    assert list(PromptVersion.objects.values_list("number", "text")) == [(1, THIRTY_LINES)]
    with pytest.raises(PromptNameTaken) as exc:
        create_prompt(alice_project, alice, "support", "Be nice.")
    assert exc.value.prompt == v1.prompt and PromptVersion.objects.count() == 1


def test_a_new_version_keeps_the_rules_unless_the_user_changes_them(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "support", THIRTY_LINES, RULES).version.prompt
    url = reverse("prompt_create", args=[alice_project.slug])
    r = alice_client.post(url, {"name": "support", "text": "Be nice.", "rules": "", "version_of": prompt.pk})
    assert r.status_code == 302 and prompt.latest.number == 2
    assert prompt.latest.text == "Be nice." and prompt.latest.rules == prompt.versions.get(number=1).rules
    rules = json.dumps(RULES[:1])
    alice_client.post(url, {"name": "support", "text": "Be nice.", "rules": rules, "version_of": prompt.pk})
    assert [r["name"] for r in prompt.latest.rules] == [
        "greeting"
    ] and prompt.latest.note == "removed rule short"
    r = alice_client.post(reverse("prompt_save", args=[alice_project.slug, prompt.pk]), {"text": "Be kind."})
    assert prompt.latest.number == 4 and [r["name"] for r in prompt.latest.rules] == ["greeting"]


def test_a_new_version_is_only_made_of_a_prompt_of_the_same_project(
    alice_client, alice_project, bob, bob_project
):
    theirs = create_prompt(bob_project, bob, "theirs", "Bob's text.").prompt
    r = alice_client.post(
        reverse("prompt_create", args=[alice_project.slug]),
        {"name": "theirs", "text": "Mine now.", "version_of": theirs.pk},
    )
    assert r.status_code == 404 and theirs.versions.count() == 1


def test_an_old_version_shows_its_own_text_and_is_restored_as_a_new_version(
    alice_client, alice, alice_project
):
    save_prompt(alice_project, alice, "p", "The first text.", RULES[:1])
    prompt = save_prompt(alice_project, alice, "p", "The second text.", []).version.prompt
    r = alice_client.get(reverse("prompt_version", args=[alice_project.slug, prompt.pk, 1]))
    body = r.content.decode()
    assert "The first text." in body and "The second text." not in body
    assert 'name="text"' not in body and "Restore this version" in body
    restore = reverse("prompt_restore", args=[alice_project.slug, prompt.pk, 1])
    assert f'action="{restore}"' in body
    r = alice_client.get(reverse("prompt_detail", args=[alice_project.slug, prompt.pk]))
    assert (
        ">The second text.</textarea>" in r.content.decode()
        and "Restore this version" not in r.content.decode()
    )
    r = alice_client.post(restore, follow=True)
    assert b"Version 1 restored as version 3." in r.content
    v3 = prompt.latest
    assert (v3.number, v3.text, v3.rules, v3.note) == (
        3,
        "The first text.",
        prompt.versions.get(number=1).rules,
        "restored version 1",
    )
    assert not restore_version(prompt, alice, 3).created  # the latest already: nothing stored
    with pytest.raises(ActionError, match="no version 9"):
        restore_version(prompt, alice, 9)


def test_each_rule_edit_is_a_version_whose_note_names_the_rule(alice_client, alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text").version.prompt
    url = reverse("prompt_rules", args=[alice_project.slug, prompt.pk])
    alice_client.post(url, {"rule_name": "greeting", "kind": "starts_with", "text": "Hello"})
    alice_client.post(url, {"rule_name": "brief", "kind": "max_words", "n": "120"})
    alice_client.post(reverse("prompt_rule_remove", args=[alice_project.slug, prompt.pk]), {"name": "brief"})
    notes = list(prompt.versions.order_by("number").values_list("note", flat=True))
    assert notes == ["", "added rule greeting", "added rule brief", "removed rule brief"]
    r = alice_client.get(prompt.get_absolute_url())
    assert b"added rule greeting" in r.content and b"removed rule brief" in r.content


def test_the_diff_names_the_rules_added_removed_and_changed(alice_client, alice, alice_project):
    v1 = save_prompt(alice_project, alice, "p", "Text", RULES).version
    changed = [
        {"name": "greeting", "kind": "starts_with", "text": "Hi"},
        {"name": "json", "kind": "json_valid"},
    ]
    v2 = save_prompt(alice_project, alice, "p", "Text", changed).version
    assert v2.note == "removed rule short; changed rule greeting; added rule json"
    changes = {(c.change, c.name): c.details for c in rule_changes(v1.rules, v2.rules)}
    assert changes == {
        ("removed", "short"): ["at most 80 words"],
        ("changed", "greeting"): ['text: "Hello" → "Hi"'],
        ("added", "json"): ["valid JSON"],
    }
    v3 = save_prompt(alice_project, alice, "p", "Text", [{**changed[0], "case_sensitive": False}]).version
    [change] = rule_changes(v2.rules, v3.rules)[1:]
    assert (change.change, change.name, change.details) == (
        "changed",
        "greeting",
        ["case_sensitive: true → false"],
    )
    r = alice_client.get(reverse("prompt_diff", args=[alice_project.slug, v1.prompt_id]) + "?a=1&b=2")
    body = r.content.decode()
    assert "has 2" not in body
    assert re.search(r"removed</span> <strong>short</strong>", body)
    assert re.search(r"added</span> <strong>json</strong>", body)
    assert "changed</span> <strong>greeting</strong>: text: &quot;Hello&quot; → &quot;Hi&quot;" in body
    assert rule_changes(v1.rules, list(reversed(v1.rules))) == []  # only the order differs


def test_the_token_cost_names_the_default_system_line_it_replaces(
    alice_client, alice, alice_project, tiny_model_dir
):
    model = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    version = save_prompt(alice_project, alice, "p", "Be kind and brief.").version
    [cost] = token_costs(version)
    assert cost["default_system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert cost["default_tokens"] > cost["text"] > 0
    assert cost["per_request"] == cost["text"] - cost["default_tokens"] + cost["framing"] < 0
    assert cost["context"] == 8192 and cost["too_long"] is None
    r = alice_client.get(version.get_absolute_url())
    body = r.content.decode()
    assert f"<td>−{cost['default_tokens']}</td>" in body
    assert "shorter than the default line it replaces" in body
    # counted once, kept on the version for the pages and jobs that follow
    assert PromptVersion.objects.get(pk=version.pk).token_counts["tiny"]["per_request"] == cost["per_request"]
    model.path = "/nowhere"
    model.save()
    assert (
        "error" in token_costs(PromptVersion.objects.get(pk=version.pk))[0]
    )  # a moved model is counted again


def test_a_prompt_longer_than_the_context_is_marked_too_long(
    alice_client, alice, alice_project, tiny_model_dir
):
    model = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    text = "Always quote the refund policy word for word when asked about refunds. " * 2800  # ~200,000 chars
    version = save_prompt(alice_project, alice, "long", text).version
    reason = version.too_long_for(model)
    assert reason is not None and "8,192 tokens" in reason and "long@1" in reason
    stored = PromptVersion.objects.get(pk=version.pk).token_counts["tiny"]
    assert stored["request_total"] > 8192 and stored["context"] == 8192
    r = alice_client.get(version.get_absolute_url())
    assert "Too long for tiny." in r.content.decode()
    short = save_prompt(alice_project, alice, "short", "Be brief.").version
    assert short.too_long_for(model) is None


def test_the_import_prompt_command_warns_when_the_prompt_is_too_long(
    alice_project, tiny_model_dir, tmp_path, capsys
):
    FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    f = tmp_path / "prompt.md"
    f.write_text("Always quote the refund policy word for word when asked about refunds. " * 2800)
    call_command("import_prompt", str(f), "--project", alice_project.slug, "--name", "long")
    err = capsys.readouterr().err
    assert "warning: long@1 is" in err and "8,192 tokens" in err
