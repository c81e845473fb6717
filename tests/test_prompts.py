import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse

from workbench.actions import ActionError
from workbench.actions_data import save_prompt
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
    alice_client.post(url, {"remove": "hi"})
    assert [r["name"] for r in prompt.latest.rules] == ["json"]
    fields = alice_client.get(reverse("rule_params", args=[alice_project.slug]) + "?kind=regex")
    assert b'name="pattern"' in fields.content and b'value="ignorecase"' in fields.content


def test_it_diffs_two_versions(alice_client, alice, alice_project):
    save_prompt(alice_project, alice, "p", "line one\nline two\n")
    prompt = save_prompt(alice_project, alice, "p", "line one\nline 2\n").version.prompt
    r = alice_client.get(reverse("prompt_diff", args=[alice_project.slug, prompt.pk]) + "?a=1&b=2")
    assert ("del", "-line two") in r.context["lines"] and ("add", "+line 2") in r.context["lines"]


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
