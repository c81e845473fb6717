import pytest
from django.urls import reverse

from workbench.models import Membership, Project

pytestmark = pytest.mark.django_db


def test_it_requires_login(client):
    r = client.get(reverse("project_list"))
    assert r.status_code == 302 and r["Location"].startswith(reverse("login"))


def test_it_logs_in_with_the_form(client, alice):
    r = client.post(reverse("login"), {"username": "alice", "password": "alice-password"})
    assert r.status_code == 302
    assert client.get(reverse("project_list")).status_code == 200


def test_it_lists_only_my_projects(alice_client, alice_project, bob_project):
    r = alice_client.get(reverse("project_list"))
    assert b"Alpha" in r.content
    assert b"Bravo" not in r.content


def test_it_hides_another_teams_project(alice_client, bob_project):
    assert alice_client.get(reverse("project_detail", args=[bob_project.slug])).status_code == 404
    r = alice_client.post(
        reverse("member_add", args=[bob_project.slug]), {"username": "alice", "role": "owner"}
    )
    assert r.status_code == 404
    assert not Membership.objects.filter(project=bob_project, user__username="alice").exists()


def test_it_creates_a_project_with_its_creator_as_owner(alice_client, alice):
    r = alice_client.post(reverse("project_create"), {"name": "Support bot", "description": "d"})
    project = Project.objects.get(name="Support bot")
    assert r.status_code == 302 and r["Location"] == project.get_absolute_url()
    assert project.slug == "support-bot"
    assert project.role_of(alice) == Membership.OWNER


def test_it_rejects_a_project_without_a_name(alice_client):
    r = alice_client.post(reverse("project_create"), {"name": "  "}, follow=True)
    assert b"A project needs a name." in r.content
    assert not Project.objects.exists()


def test_it_gives_unique_slugs(alice):
    from workbench.actions.projects import create_project

    assert create_project(alice, "Same").slug == "same"
    assert create_project(alice, "Same!").slug == "same-2"


def test_owner_adds_a_member_who_then_sees_the_project(alice_client, alice_project, bob, client):
    alice_client.post(reverse("member_add", args=[alice_project.slug]), {"username": "bob", "role": "member"})
    assert alice_project.role_of(bob) == Membership.MEMBER
    client.force_login(bob)
    assert client.get(reverse("project_detail", args=[alice_project.slug])).status_code == 200


def test_a_member_cannot_add_members(alice_project, bob, client, django_user_model):
    Membership.objects.create(project=alice_project, user=bob, role=Membership.MEMBER)
    django_user_model.objects.create_user("carol")
    client.force_login(bob)
    r = client.post(reverse("member_add", args=[alice_project.slug]), {"username": "carol"}, follow=True)
    assert b"Only an owner can add members." in r.content
    assert alice_project.memberships.count() == 2


def test_it_keeps_the_last_owner(alice_client, alice_project, alice):
    m = alice_project.memberships.get(user=alice)
    r = alice_client.post(reverse("member_remove", args=[alice_project.slug, m.pk]), follow=True)
    assert b"at least one owner" in r.content
    assert alice_project.memberships.filter(pk=m.pk).exists()


def test_it_sends_the_csrf_token_on_htmx_requests(alice_client, alice_project):
    r = alice_client.get(reverse("project_detail", args=[alice_project.slug]))
    assert b'hx-headers=\'{"X-CSRFToken": "' in r.content
    assert b"/static/vendor/htmx-2.0.11.min.js" in r.content


def test_it_shows_base_models_and_workers(alice_client):
    from workbench.models import FoundationModel, WorkerHeartbeat

    FoundationModel.objects.create(name="Tiny", path="/m/tiny", is_default=True, parameters=3_200_000)
    WorkerHeartbeat.objects.create(hostname="w1@host", queues="default,gpu", pid=4242)
    r = alice_client.get(reverse("models"))
    assert b"Tiny" in r.content and b"3,200,000" in r.content
    assert b"w1@host" in r.content and b"alive" in r.content and b"pid 4242" in r.content
    fragment = alice_client.get(reverse("models") + "?fragment=workers", headers={"HX-Request": "true"})
    assert fragment.content.strip().startswith(b'<div id="workers"') and b"<html" not in fragment.content


def test_a_project_form_with_errors_keeps_what_was_typed(alice_client):
    r = alice_client.post(reverse("project_create"), {"name": "  ", "description": "What we absorb"})
    body = r.content.decode()
    assert r.status_code == 400 and "A project needs a name." in body
    assert ">What we absorb</textarea>" in body
    assert not Project.objects.exists()


def test_a_member_form_with_errors_keeps_what_was_typed(alice_client, alice_project):
    url = reverse("member_add", args=[alice_project.slug])
    r = alice_client.post(url, {"username": "zed", "role": "owner"})
    body = r.content.decode()
    assert r.status_code == 400 and "No user named &#x27;zed&#x27;." in body
    assert 'value="zed"' in body and '<option value="owner" selected>' in body
    r = alice_client.post(url, {"username": "bob", "role": "admin"})
    assert r.status_code == 400 and b"Unknown role &#x27;admin&#x27;." in r.content
    assert alice_project.memberships.count() == 1


def test_it_refuses_a_ping_to_an_unknown_queue(alice_client):
    from workbench.actions import ActionError
    from workbench.actions.models import send_ping
    from workbench.models import WorkerPing

    with pytest.raises(ActionError, match="Unknown queue 'cpu'"):
        send_ping("cpu")
    r = alice_client.post(reverse("ping_workers"), {"queue": "cpu"}, follow=True)
    assert b"Unknown queue" in r.content and not WorkerPing.objects.exists()


# --- a new user's first hour ------------------------------------------------------


def test_project_names_are_unique_ignoring_case(alice_client, alice, bob):
    from django.db import IntegrityError, transaction

    from workbench.actions import ActionError
    from workbench.actions.projects import create_project

    create_project(alice, "Support bot")
    r = alice_client.post(reverse("project_create"), {"name": " support BOT ", "description": "Ours"})
    body = r.content.decode()
    assert r.status_code == 400 and "Name: A project named “Support bot” already exists" in body
    assert 'value=" support BOT "' in body and ">Ours</textarea>" in body and 'aria-invalid="true"' in body
    with pytest.raises(ActionError, match="already exists"):
        create_project(bob, "SUPPORT BOT")
    with pytest.raises(IntegrityError), transaction.atomic():  # the database holds the rule too
        Project.objects.create(name="support Bot", slug="other")
    assert Project.objects.count() == 1


def test_models_and_serving_keeps_the_project_the_user_came_from(alice_client, alice_project, bob_project):
    assert alice_client.get(reverse("models")).context["project"] is None
    alice_client.get(reverse("prompt_list", args=[alice_project.slug]))
    r = alice_client.get(reverse("models"))
    assert r.context["project"] == alice_project
    assert f'href="{reverse("prompt_list", args=[alice_project.slug])}"'.encode() in r.content
    # ?project= picks another of the user's projects, never someone else's
    assert alice_client.get(reverse("models") + f"?project={bob_project.slug}").context["project"] is None


def test_the_login_form_keeps_the_username_after_a_wrong_password(client, alice):
    r = client.post(reverse("login"), {"username": "alice", "password": "wrong"})
    assert r.status_code == 200 and b"didn't match" in r.content and b'value="alice"' in r.content


def test_removing_a_member_revokes_their_keys_and_the_owner_is_told(
    alice, alice_client, alice_project, bob, bob_project, client
):
    from serving.actions import create_api_key
    from serving.models import ApiKey

    membership = Membership.objects.create(project=alice_project, user=bob, role=Membership.MEMBER)
    bobs_key, bobs_raw = create_api_key(bob, alice_project, "bob's script")
    _, alices_raw = create_api_key(alice, alice_project, "alice's")
    _, own_raw = create_api_key(bob, bob_project, "bob's own project")
    for raw in (bobs_raw, alices_raw, own_raw):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code == 200

    r = alice_client.post(reverse("member_remove", args=[alice_project.slug, membership.pk]), follow=True)
    page = r.content.decode()
    assert "Member removed." in page
    assert f"{bobs_key.prefix}… (bob&#x27;s script)" in page and "was revoked" in page
    refused = client.post(
        "/v1/chat/completions",
        {"model": f"{alice_project.slug}/production", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
        headers={"Authorization": f"Bearer {bobs_raw}"},
    )
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {bobs_raw}"}).status_code == 401
    # The owner's keys, and bob's keys of his own project, still work.
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {alices_raw}"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {own_raw}"}).status_code == 200
    assert list(ApiKey.objects.filter(revoked_at__isnull=False)) == [bobs_key]
