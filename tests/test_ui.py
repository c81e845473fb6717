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
    # The teacher first writes questions about the prompt (by default), then answers them.
    expect(page.get_by_role("heading", name="Query synthesis #")).to_be_visible()
    expect(page.locator("#job-status")).to_have_text("queued")
    page.once("dialog", lambda dialog: dialog.accept())  # "Cancel this job?"
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status")).to_have_text("cancelled")
    jobs = [(j.kind, j.status) for j in Job.objects.order_by("pk")]
    assert jobs == [("synthesize", "cancelled"), ("teacher", "cancelled"), ("finetune", "cancelled")]
    page.screenshot(path=str(tmp_path / "job.png"), full_page=True)


def test_an_alias_is_switched_to_merged_weights_from_its_page(
    page, alice, alice_project, engine, lively_dir, tmp_path
):
    import os

    import httpx

    from serving.models import Alias
    from tests.conftest import build_random_lora
    from workbench.models import FoundationModel, Variant

    base = FoundationModel.objects.create(name="tiny-lively", path=str(lively_dir))
    adapter = build_random_lora(lively_dir, tmp_path / "adapter", seed=1)
    student = Variant.objects.create(
        project=alice_project, name="student", base_model=base, adapter_path=str(adapter)
    )
    Alias.objects.update_or_create(project=alice_project, name="production", defaults={"variant": student})

    login(page, "alice", "alice-password")
    page.goto(f"/p/{alice_project.slug}/serving/aliases/production/")
    box = page.locator("#deployment")
    expect(box).to_contain_text("The engine serves student as an adapter over its base.")
    box.get_by_label("Serve as merged weights").check()
    box.get_by_role("button", name="Save").click()
    expect(page.locator("body")).to_contain_text("production is served as merged weights.")
    expect(page.locator("#deployment")).to_contain_text("The engine serves student as merged weights.")
    models = {m["id"] for m in httpx.get(f"{engine.url}/v1/models").json()["data"]}
    assert f"merged-variant-{student.pk}" in models
    if os.environ.get("WORKBENCH_SCREENSHOTS"):
        page.locator("#deployment").screenshot(
            path=os.path.join(os.environ["WORKBENCH_SCREENSHOTS"], "alias-merged.png")
        )
