"""Per-project API keys: stored hashed (the raw key nowhere in the
database), shown once, listed by prefix, revoked from the page, made
headless with create_api_key, and out of reach of another team."""

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse

from serving.actions import create_api_key, revoke_api_key
from serving.models import ApiKey, hash_key
from workbench.actions import ActionError

pytestmark = pytest.mark.django_db


def database_holds(raw: str) -> bool:
    """Whether the raw key is in any column of the keys table."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiKey._meta.db_table}")
        return any(raw in str(value) for row in cursor.fetchall() for value in row)


def test_a_key_is_stored_hashed_and_the_raw_key_nowhere(alice, alice_project):
    key, raw = create_api_key(alice, alice_project, "support bot")
    assert raw.startswith("wb-") and len(raw) > 40
    assert key.hashed == hash_key(raw) and key.prefix == raw[:10] and key.name == "support bot"
    assert key.created_by == alice and key.active and not database_holds(raw)
    other, raw2 = create_api_key(alice, alice_project)
    assert raw2 != raw and other.hashed != key.hashed


def test_the_page_shows_a_new_key_once(alice_client, alice_project):
    url = reverse("serving_keys", args=[alice_project.slug])
    posted = alice_client.post(url, {"name": "ci"})
    assert posted.status_code == 302 and posted["Location"] == url  # POST/redirect/GET: a reload makes no key
    created = alice_client.get(url)
    page = created.content.decode()
    raw = page.split('id="raw-key" class="mono"')[0].rsplit('value="', 1)[1].split('"')[0]
    key = ApiKey.objects.get()
    assert created.status_code == 200 and created["Cache-Control"] == "no-store"
    assert key.hashed == hash_key(raw) and "shown this once" in page
    assert (
        f"Bearer {raw}" in page and f'{alice_project.slug}/production"' in page
    )  # the snippets, ready to paste
    again = alice_client.get(url).content.decode()
    assert raw not in again and f"{key.prefix}…" in again and "ci" in again
    assert "http://testserver/v1/chat/completions" in again and "$WORKBENCH_API_KEY" in again


def test_revoking_a_key_stops_it_on_v1(alice, alice_client, alice_project):
    key, raw = create_api_key(alice, alice_project, "old")
    auth = {"Authorization": f"Bearer {raw}"}
    assert alice_client.get("/v1/models", headers=auth).status_code == 200
    response = alice_client.post(reverse("serving_key_revoke", args=[alice_project.slug, key.pk]))
    assert response.status_code == 302
    key.refresh_from_db()
    assert not key.active and "revoked" in alice_client.get(response["Location"]).content.decode()
    refused = alice_client.get("/v1/models", headers=auth)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(ActionError, match="already revoked"):
        revoke_api_key(alice, key)


def test_another_team_cannot_see_or_revoke_a_key(alice, alice_project, bob, bob_project, client):
    key, _ = create_api_key(alice, alice_project, "secret-name")
    client.force_login(bob)
    assert client.get(reverse("serving_keys", args=[alice_project.slug])).status_code == 404
    assert client.post(reverse("serving_key_revoke", args=[alice_project.slug, key.pk])).status_code == 404
    # Bob's own project does not reach Alice's key by id either.
    assert client.post(reverse("serving_key_revoke", args=[bob_project.slug, key.pk])).status_code == 404
    assert "secret-name" not in client.get(reverse("serving_keys", args=[bob_project.slug])).content.decode()
    key.refresh_from_db()
    assert key.active


def test_the_command_prints_the_key_once(alice_project, capsys):
    call_command("create_api_key", "--project", alice_project.slug, "--name", "deploy")
    out = capsys.readouterr()
    raw = out.out.strip()
    key = ApiKey.objects.get()
    assert (
        raw.startswith("wb-")
        and key.hashed == hash_key(raw)
        and key.name == "deploy"
        and key.created_by is None
    )
    assert "not shown again" in out.err and raw not in out.err and not database_holds(raw)
    with pytest.raises(CommandError, match="No project 'nope'"):
        call_command("create_api_key", "--project", "nope")
