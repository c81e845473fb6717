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


def test_the_path_from_prompt_to_a_queued_job(page, alice, alice_project, tiny_model_dir, tmp_path):
    from jobs.models import Job
    from workbench.models import FoundationModel

    FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir), is_default=True)
    login(page, "alice", "alice-password")
    page.goto(f"/p/{alice_project.slug}/")
    page.get_by_role("link", name="Prompts").first.click()
    page.get_by_label("Name").fill("support")
    page.get_by_label("Text").fill("You are Nova. Always start with 'Hello'.")
    page.get_by_role("button", name="Save prompt").click()
    expect(page.get_by_text("Saved support version 1.")).to_be_visible()
    expect(page.get_by_role("cell", name="tiny")).to_be_visible()  # token cost under the base model

    page.get_by_label("Rule name").fill("greeting")
    page.get_by_label("Kind").select_option("starts_with")
    page.get_by_label("text").fill("Hello")  # fields loaded by htmx for this kind
    page.get_by_role("button", name="Save rules").click()
    expect(page.get_by_text("Rules saved as version 2.")).to_be_visible()
    expect(page.get_by_text('starts with "Hello"')).to_be_visible()

    page.get_by_role("link", name="Datasets").first.click()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n')
    page.get_by_label("File").set_input_files(str(bad))
    page.get_by_role("button", name="Upload and validate").click()
    expect(page.get_by_text("line 2: invalid JSON")).to_be_visible()
    good = tmp_path / "queries.txt"
    good.write_text("How do I reset my password?\nWhere is my parcel?\nCan I pay by invoice?\n")
    page.get_by_label("File").set_input_files(str(good))
    page.get_by_role("button", name="Upload and validate").click()
    expect(page.get_by_text("Stored queries@1: 3 rows (lines).")).to_be_visible()
    expect(page.get_by_text("Where is my parcel?")).to_be_visible()

    page.get_by_role("link", name="Jobs").first.click()
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_role("heading", name="Teacher generation #")).to_be_visible()
    expect(page.locator("#job-status")).to_have_text("queued")
    page.once("dialog", lambda dialog: dialog.accept())  # "Cancel this job?"
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status")).to_have_text("cancelled")
    assert [j.status for j in Job.objects.order_by("pk")] == ["cancelled", "cancelled"]
    page.screenshot(path=str(tmp_path / "job.png"), full_page=True)
