"""The UI path in a real browser."""

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def login(page, username: str, password: str) -> None:
    page.goto("/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_it_creates_a_project_and_adds_a_member(page, alice, bob, tmp_path):
    login(page, "alice", "alice-password")
    expect(page.get_by_role("heading", name="Projects", exact=True)).to_be_visible()
    page.get_by_label("Name").fill("Support bot")
    page.get_by_role("button", name="Create project").click()
    expect(page.get_by_role("heading", name="Support bot")).to_be_visible()
    page.get_by_label("Username").fill("bob")
    page.get_by_role("button", name="Add member").click()
    expect(page.get_by_text("bob added as member.")).to_be_visible()
    page.screenshot(path=str(tmp_path / "project.png"))


def test_it_rejects_a_wrong_password(page, alice):
    login(page, "alice", "wrong")
    expect(page.get_by_text("didn't match")).to_be_visible()


def test_a_non_member_gets_404_in_the_browser(page, alice, bob_project):
    login(page, "alice", "alice-password")
    response = page.goto(f"/p/{bob_project.slug}/")
    assert response.status == 404
