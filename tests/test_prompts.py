import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse

from tests.threads import run_together
from workbench.actions import ActionError
from workbench.actions.prompts import add_rule, diff_versions, remove_rule, save_prompt
from workbench.models import BaseModel, Prompt, PromptVersion

pytestmark = pytest.mark.django_db

RULES = [{"name": "greeting", "kind": "starts_with", "text": "Hello"},
         {"name": "short", "kind": "max_words", "n": 80}]


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
        save_prompt(alice_project, alice, "support", "Text", [{"name": "a", "kind": "startswith"},
                                                              {"name": "b", "kind": "max_words"}])
    assert "unknown kind 'startswith'" in str(exc.value) and "'n'" in str(exc.value)
    assert not Prompt.objects.exists()  # all or nothing


def test_it_rejects_an_empty_or_too_long_prompt(alice, alice_project, settings):
    with pytest.raises(ActionError, match="empty"):
        save_prompt(alice_project, alice, "p", "   ")
    settings.PROMPT_MAX_CHARS = 10
    with pytest.raises(ActionError, match="limit is 10"):
        save_prompt(alice_project, alice, "p", "x" * 11)


def test_it_takes_a_large_uploaded_prompt(alice_client, alice_project):
    text = ("Rule: always be precise about refund windows and order numbers.\n" * 800)  # ~52k chars
    upload = SimpleUploadedFile("prompt.md", text.encode(), content_type="text/markdown")
    r = alice_client.post(reverse("prompt_create", args=[alice_project.slug]), {"name": "big", "file": upload})
    assert r.status_code == 302
    assert PromptVersion.objects.get().text == text


def test_it_refuses_a_prompt_file_that_is_not_utf8(alice_client, alice_project):
    upload = SimpleUploadedFile("p.txt", b"ok\ncaf\xe9\n")
    r = alice_client.post(reverse("prompt_create", args=[alice_project.slug]), {"name": "p", "file": upload},
                          follow=True)
    assert b"not valid UTF-8 on line 2" in r.content
    assert not Prompt.objects.exists()


def test_it_shows_token_costs_under_each_base_model(alice_client, alice, alice_project, tiny_model_dir):
    BaseModel.objects.create(name="tiny", path=str(tiny_model_dir))
    prompt = save_prompt(alice_project, alice, "pirate", "You are a pirate. Always start with Arrr!").version.prompt
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
    assert b"rule 3" in r.content and prompt.latest.number == 3
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
    for url in [reverse("prompt_list", args=[slug]), reverse("prompt_detail", args=[slug, prompt.pk]),
                reverse("prompt_version", args=[slug, prompt.pk, 1]), reverse("prompt_diff", args=[slug, prompt.pk])]:
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
    call_command("import_prompt", str(f), "--project", alice_project.slug, "--name", "sp", "--rules", str(rules))
    assert "stored as version 1" in capsys.readouterr().out
    f.write_text("You are very helpful.")
    call_command("import_prompt", str(f), "--project", alice_project.slug, "--name", "sp")
    latest = Prompt.objects.get(name="sp").latest
    assert latest.number == 2 and len(latest.rules) == 2
    rules.write_text('[{"name": "x", "kind": "max_words", "n": -1}]')
    with pytest.raises(CommandError, match="rule 1"):
        call_command("import_prompt", str(f), "--project", alice_project.slug, "--name", "sp", "--rules", str(rules))
    rules.write_text('[{"name": }]')
    with pytest.raises(CommandError, match="line 1: invalid JSON"):
        call_command("import_prompt", str(f), "--project", alice_project.slug, "--name", "sp", "--rules", str(rules))
    with pytest.raises(CommandError, match="No project 'nope'"):
        call_command("import_prompt", str(f), "--project", "nope", "--name", "sp")
    assert Prompt.objects.get(name="sp").latest.number == 2


# --- rules, diffs and forms through the actions ---------------------------------

def test_it_adds_and_removes_rules_through_the_action(alice, alice_project):
    prompt = save_prompt(alice_project, alice, "p", "Text", RULES[:1]).version.prompt
    saved = add_rule(prompt, alice, {"name": "short", "kind": "max_words", "n": 5})
    assert saved.created and saved.version.number == 2 and saved.version.text == "Text"
    assert [r["name"] for r in saved.version.rules] == ["greeting", "short"]
    assert saved.version.note == "rules edited"
    saved = remove_rule(prompt, alice, "greeting")
    assert saved.version.number == 3 and [r["name"] for r in saved.version.rules] == ["short"]


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
    run_together(lambda: add_rule(prompt, alice, {"name": "a", "kind": "lowercase"}),
                 lambda: add_rule(prompt, alice, {"name": "b", "kind": "json_valid"}))
    latest = prompt.latest
    assert latest.number == 3 and sorted(r["name"] for r in latest.rules) == ["a", "b"]


def test_it_builds_the_diff_in_the_action(alice, alice_project):
    v1 = save_prompt(alice_project, alice, "p", "same\nold\n", RULES).version
    v2 = save_prompt(alice_project, alice, "p", "same\nnew\n", RULES[:1]).version
    diff = diff_versions(v1, v2)
    assert diff.lines == [("meta", "--- version 1"), ("meta", "+++ version 2"), ("meta", "@@ -1,2 +1,2 @@"),
                          ("ctx", " same"), ("del", "-old"), ("add", "+new")]
    assert diff.rules_changed and not diff_versions(v2, v2).rules_changed and diff_versions(v2, v2).lines == []


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
    r = alice_client.post(url, {"rule_name": "dear", "kind": "regex", "pattern": "(Dear", "flags": ["multiline"]})
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
    alice_client.post(url, {"rule_name": "re", "kind": "regex", "pattern": "x", "flags": ["dotall", "multiline"],
                            "must_match": "on"})
    assert prompt.latest.rules == [
        {"name": "short", "kind": "max_words", "n": 12},
        {"name": "hi", "kind": "starts_with", "text": "Hi", "case_sensitive": False},
        {"name": "re", "kind": "regex", "pattern": "x", "flags": ["dotall", "multiline"], "must_match": True},
    ]


def test_a_prompt_form_with_errors_keeps_what_was_typed(alice_client, alice, alice_project):
    url = reverse("prompt_create", args=[alice_project.slug])
    r = alice_client.post(url, {"name": "support", "text": "Be kind.", "rules": '[{"name": }]', "note": "n1"})
    body = r.content.decode()
    assert r.status_code == 400 and "Rules are not valid JSON" in body
    assert 'value="support"' in body and ">Be kind.</textarea>" in body and "[{&quot;name&quot;: }]</textarea>" in body
    r = alice_client.post(url, {"name": "support", "text": "  "})
    assert r.status_code == 400 and b"The prompt text is empty." in r.content
    assert not Prompt.objects.exists()
    prompt = save_prompt(alice_project, alice, "support", "Be kind.").version.prompt
    r = alice_client.post(reverse("prompt_save", args=[alice_project.slug, prompt.pk]),
                          {"text": "x" * 20, "note": "longer"}, follow=True)
    assert prompt.latest.number == 2
    r = alice_client.post(reverse("prompt_save", args=[alice_project.slug, prompt.pk]),
                          {"text": "", "note": "typed note"})
    body = r.content.decode()
    assert r.status_code == 400 and "The prompt text is empty." in body and 'value="typed note"' in body
    assert prompt.latest.number == 2
