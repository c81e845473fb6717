"""A new user's first hour, in a real browser: what a person sees on the
prompt, dataset, project and models pages."""

import io
import itertools
import re

import pytest
from playwright.sync_api import expect

from workbench.actions.datasets import import_dataset
from workbench.actions.prompts import save_prompt
from workbench.models import FoundationModel, PromptVersion
from workbench.tasks import compute_token_stats

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

LONG_TEXT = "".join(
    f"{i}. Answer in the customer's language and cite the order number.\n" for i in range(1, 31)
)
RULES = [
    {"name": "greeting", "kind": "starts_with", "text": "Hello"},
    {"name": "brief", "kind": "max_words", "n": 120},
]


def login(page, username: str = "alice", password: str = "alice-password") -> None:
    page.goto("/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Projects", exact=True)).to_be_visible()


def box(locator) -> dict[str, float]:
    b = locator.bounding_box()
    assert b is not None
    return b


def test_it_refuses_a_new_prompt_under_a_taken_name_and_offers_a_new_version(page, alice, alice_project):
    v1 = save_prompt(alice_project, alice, "support", LONG_TEXT, RULES).version
    login(page)
    page.goto(f"/p/{alice_project.slug}/prompts/")
    page.get_by_label("Name").fill("support")
    page.get_by_label("Text").fill("Be nice.")
    page.get_by_role("button", name="Save prompt").click()
    expect(page.get_by_text("A prompt named “support” already exists")).to_be_visible()
    expect(page.get_by_label("Text")).to_have_value("Be nice.")  # what was typed is kept
    link = page.get_by_role("link", name="Open “support”")
    expect(link).to_have_attribute("href", v1.prompt.get_absolute_url())
    page.get_by_label("Name").press("Enter")  # Enter saves a new prompt, never a version of the old one
    expect(page.get_by_text("A prompt named “support” already exists")).to_be_visible()
    assert list(v1.prompt.versions.values_list("number", flat=True)) == [1]

    page.get_by_role("button", name="Save this text as a new version of “support”").click()
    expect(page.get_by_text("Saved support version 2.")).to_be_visible()
    v2 = v1.prompt.latest
    assert v2.number == 2 and v2.text == "Be nice." and v2.rules == v1.rules  # the rules were not dropped
    expect(page.get_by_text('starts with "Hello"')).to_be_visible()


def test_an_old_version_shows_its_own_text_and_can_be_restored(page, alice, alice_project):
    save_prompt(alice_project, alice, "support", "The first text.", RULES[:1])
    v2 = save_prompt(alice_project, alice, "support", "The second text.", []).version
    login(page)
    page.goto(v2.prompt.versions.get(number=1).get_absolute_url())
    expect(page.locator("pre.prompt-text")).to_have_text("The first text.")
    expect(page.get_by_text("The second text.")).to_have_count(0)  # no editor filled with the latest text
    expect(page.locator("textarea[name=text]")).to_have_count(0)
    page.get_by_role("button", name="Restore this version").click()
    expect(page.get_by_text("Version 1 restored as version 3.")).to_be_visible()
    expect(page.locator("pre.prompt-text")).to_have_text("The first text.")
    v3 = v2.prompt.latest
    assert (v3.number, v3.text, v3.rules, v3.note) == (
        3,
        "The first text.",
        v2.prompt.versions.get(number=1).rules,
        "restored version 1",
    )


def test_the_token_cost_explains_the_default_system_line_and_warns_when_too_long(
    page, alice, alice_project, tiny_model_dir
):
    model = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    short = save_prompt(alice_project, alice, "short", "Be kind and brief.").version
    login(page)
    page.goto(short.get_absolute_url())
    explained = page.locator(".cost-explained")
    expect(explained).to_contain_text(
        "“You are a helpful AI assistant named SmolLM, trained by Hugging Face”"
    )
    expect(explained).to_contain_text("shorter than the default line it replaces")
    cost = short.cost_under(model)
    assert cost["per_request"] < 0 and cost["per_request"] == cost["text"] - cost["default_tokens"]
    row = page.locator("table.cost tbody tr")
    expect(row).to_have_text(
        re.compile(
            rf"tiny\s*{cost['text']}\s*−{cost['default_tokens']}\s*"
            rf"{cost['per_request']}"
        )
    )
    expect(page.locator(".too-long")).to_have_count(0)

    huge = "Always quote the refund policy word for word when asked about refunds. " * 2800  # ~200,000 chars
    long = save_prompt(alice_project, alice, "long", huge).version
    page.goto(long.get_absolute_url())
    warning = page.get_by_role("alert").filter(has_text="Too long for tiny")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("8,192 tokens")
    long = PromptVersion.objects.get(pk=long.pk)
    assert long.token_counts["tiny"]["request_total"] > 8192  # stored on the version for later steps
    assert "8,192" in long.too_long_for(model) and short.too_long_for(model) is None


def test_the_token_lengths_say_they_include_the_chat_template(page, alice, alice_project, tiny_model_dir):
    model = FoundationModel.objects.create(name="tiny", path=str(tiny_model_dir))
    version = import_dataset(
        alice_project, alice, "queries", io.BytesIO(b"Where is my parcel?\nHi\n"), filename="q.txt"
    )
    compute_token_stats(version.pk, model.pk)
    login(page)
    page.goto(version.get_absolute_url())
    expect(page.get_by_role("heading", name="Token lengths, chat template included")).to_be_visible()
    expect(page.locator(".stats-explained")).to_contain_text("chat template")
    expect(page.locator(".stats-explained")).to_contain_text("default system line")
    expect(page.locator("#stats")).to_contain_text("tokens per conversation")


def test_models_and_serving_keeps_the_project_nav(page, alice, alice_project):
    login(page)
    page.goto(alice_project.get_absolute_url())
    # The top nav's link (the dashboard's engine panel links the page too, once it has loaded).
    page.locator("header.topbar nav").get_by_role("link", name="Models & serving", exact=True).click()
    expect(page.get_by_role("heading", name="Models & serving")).to_be_visible()
    nav = page.locator("header.topbar nav")
    for name in ("Prompts", "Datasets", "Jobs"):
        expect(nav.get_by_role("link", name=name, exact=True)).to_be_visible()
    nav.get_by_role("link", name="Prompts", exact=True).click()
    expect(page).to_have_url(re.compile(rf"/p/{alice_project.slug}/prompts/$"))


def test_counts_are_in_the_singular_when_there_is_one(page, alice, alice_project):
    import_dataset(alice_project, alice, "one", io.BytesIO(b"Where is my parcel?\n"), filename="q.txt")
    save_prompt(alice_project, alice, "p", "Be kind.", RULES[:1])
    login(page)
    plural_of_one = re.compile(
        r"\b1 (rows|versions|errors|members|rules|prompts|datasets|jobs|duplicates|"
        r"characters|tokens|conversations)\b"
    )
    for path in [
        "/",
        alice_project.get_absolute_url(),
        f"/p/{alice_project.slug}/datasets/",
        f"/p/{alice_project.slug}/prompts/",
        f"/p/{alice_project.slug}/datasets/1/",
    ]:
        page.goto(path)
        text = page.locator("main").inner_text()
        assert not plural_of_one.search(text), (path, plural_of_one.search(text))
    page.goto(f"/p/{alice_project.slug}/datasets/")
    expect(page.get_by_text("1 row · lines")).to_be_visible()


def test_the_add_member_controls_line_up_and_diff_lines_are_single_spaced(
    page, alice, alice_project, tmp_path
):
    login(page)
    page.goto(alice_project.get_absolute_url())
    page.wait_for_load_state(
        "networkidle"
    )  # the dashboard's panels load after the page, moving what is below
    controls = [
        page.get_by_label("Username"),
        page.get_by_label("Role"),
        page.get_by_role("button", name="Add member"),
    ]
    boxes = [box(c) for c in controls]
    page.screenshot(path=str(tmp_path / "members.png"), full_page=True)
    assert max(b["height"] for b in boxes) - min(b["height"] for b in boxes) <= 2, boxes
    assert max(b["y"] for b in boxes) - min(b["y"] for b in boxes) <= 2, boxes

    page.goto("/models/")
    # The engine panel above the form fills in after the page: measure once it has.
    expect(page.locator("#engine-panel [aria-busy]")).to_have_count(0, timeout=30_000)
    group = [box(page.get_by_label("Queue")), box(page.get_by_role("button", name="Send a test task"))]
    assert abs(group[0]["height"] - group[1]["height"]) <= 2 and abs(group[0]["y"] - group[1]["y"]) <= 2, (
        group
    )

    for name in ("a", "a"):
        version = import_dataset(
            alice_project, alice, name, io.BytesIO(b"Where is my parcel?\n"), filename="q.txt"
        )
    page.goto(version.get_absolute_url())
    page.screenshot(path=str(tmp_path / "dataset.png"), full_page=True)
    items = page.locator("ul.version-list li")
    assert items.count() == 2
    font_size = float(items.first.evaluate("e => parseFloat(getComputedStyle(e).fontSize)"))
    for i in range(2):  # "v2 · Upload · 1 row · now" on one line, the link on it
        item, link = box(items.nth(i)), box(items.nth(i).locator("a"))
        assert item["height"] <= 2 * font_size, (item, font_size)
        assert abs((item["y"] + item["height"] / 2) - (link["y"] + link["height"] / 2)) <= 3, (item, link)

    save_prompt(alice_project, alice, "p", "one\ntwo\nthree\nfour\n")
    for i in range(1, len(RULES) + 1):
        prompt = save_prompt(
            alice_project, alice, "p", "one\n2\nthree\nfour\nfive\n", RULES[:i]
        ).version.prompt
    page.goto(prompt.get_absolute_url())
    page.screenshot(path=str(tmp_path / "prompt.png"), full_page=True)
    # the versions table: each row's radios, link and note sit on one line
    for tr in page.locator("form.diff-form tbody tr").all():
        cells = [box(tr.locator("td").nth(i)) for i in range(4)]
        radio, link = box(tr.locator("input[name=a]")), box(tr.locator("a"))
        assert abs((radio["y"] + radio["height"] / 2) - (link["y"] + link["height"] / 2)) <= 3, (radio, link)
        assert max(c["height"] for c in cells) - min(c["height"] for c in cells) <= 1, cells

    page.goto(f"/p/{alice_project.slug}/prompts/{prompt.pk}/diff?a=1&b=3")
    page.screenshot(path=str(tmp_path / "diff.png"), full_page=True)
    expect(page.locator(".rule-changes")).to_contain_text("added greeting: starts with")
    expect(page.locator(".rule-changes")).to_contain_text("added brief: at most 120 words")
    lines = page.locator("pre.diff > span")
    font_size = float(page.locator("pre.diff").evaluate("e => parseFloat(getComputedStyle(e).fontSize)"))
    boxes = [box(lines.nth(i)) for i in range(lines.count())]
    assert len(boxes) > 5
    for b in boxes:  # each diff line is one line of text high...
        assert font_size <= b["height"] <= 1.7 * font_size, (b, font_size)
    for upper, lower in itertools.pairwise(boxes):  # ...and the next starts right under it: no blank line
        assert abs(lower["y"] - (upper["y"] + upper["height"])) <= 1, (upper, lower)
