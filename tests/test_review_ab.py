"""Review like Kiln (issue 23, item 7): blind A/B ratings of two runs (the
names hidden until rated, the order random but stable per person and
example), per-output pass/fail and a note stored for the run they belong to,
a tally per pair of runs, keyboard shortcuts that never fire while typing;
and the dataset review queue keeps edits across pages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.urls import reverse

from evals.models import EvalResult, Rating
from evals.views import blind_order
from tests import test_hostile_pages
from tests.processes import REPO
from tests.test_ui_walk import log_in, watch
from workbench.actions.datasets import import_dataset

pytestmark = pytest.mark.django_db

# test_hostile_pages' fixture (a project, a base model, a prompt with a rule, a dataset), used by name.
world = test_hostile_pages.world
two_runs = test_hostile_pages.two_runs
SCREENSHOT = REPO / "test-artifacts" / "screenshots" / "review-ab.png"


def blind_url(world, suite, a, b, **query):
    q = "&".join(f"{k}={v}" for k, v in {"a": a.pk, "b": b.pk, **query}.items())
    return reverse("blind_review", args=[world["project"].slug, suite.pk]) + "?" + q


def rate_url(world, suite, a, b, page=1):
    return reverse("blind_rate", args=[world["project"].slug, suite.pk]) + f"?a={a.pk}&b={b.pk}&page={page}"


def test_it_hides_the_names_until_rated_and_stores_the_rating_for_the_real_runs(world, alice_client):
    suite, (a, b) = two_runs(world, examples=12)
    user = world["user"]
    examples = list(suite.examples.order_by("index"))
    orders = {blind_order(user.pk, ex.pk, a, b)[0].pk for ex in examples}
    assert orders == {a.pk, b.pk}, "the order is random per example: both runs come first somewhere"
    for number, ex in enumerate(examples, start=1):
        page = alice_client.get(blind_url(world, suite, a, b, page=number)).content.decode()
        assert "model hidden until you rate" in page and 'data-run="' not in page
        first, second = blind_order(user.pk, ex.pk, a, b)
        # Side A shows the answer of the run that comes first for this person and example.
        shown = page.index(f"of run {first.pk}</div>"), page.index(f"of run {second.pk}</div>")
        assert shown[0] < shown[1]
        choice = ["a", "b", "tie"][number % 3]
        r = alice_client.post(
            rate_url(world, suite, a, b, number),
            {"example": ex.pk, "choice": choice, "pass_a": "pass", "pass_b": "fail", "note": f"n{number}"},
            HTTP_HX_REQUEST="true",
        )
        assert r.status_code == 200, r.content
        revealed = r.content.decode()
        assert f'data-run="{first.pk}"' in revealed and f'data-run="{second.pk}"' in revealed
        assert revealed.index(f'data-run="{first.pk}"') < revealed.index(f'data-run="{second.pk}"')
        rating = Rating.objects.get(example=ex, user=user)
        assert rating.blind and rating.note == f"n{number}"
        # Stored in the runs' own terms: run_a is the lower id, whatever side it was shown on.
        assert (rating.run_a, rating.run_b) == (min(a, b, key=lambda r: r.pk), max(a, b, key=lambda r: r.pk))
        better = {"a": first, "b": second}.get(choice)
        expected = Rating.TIE if better is None else Rating.A if better == rating.run_a else Rating.B
        assert rating.choice == expected, (choice, first.pk, rating.run_a.pk)
        passes = {rating.run_a.pk: rating.pass_a, rating.run_b.pk: rating.pass_b}
        assert passes == {first.pk: True, second.pk: False}
    # Reloaded after rating: revealed, the verdicts shown on the sides they were given on.
    again = alice_client.get(blind_url(world, suite, a, b, page=1)).content.decode()
    assert 'data-run="' in again and "model hidden" not in again


def test_the_order_is_stable_on_reload_and_seeded_per_person(world, alice_client, bob):
    suite, (a, b) = two_runs(world, examples=12)
    examples = list(suite.examples.all())

    def shown_first(number):
        page = alice_client.get(blind_url(world, suite, a, b, page=number)).content.decode()
        return min((a, b), key=lambda run: page.index(f"of run {run.pk}</div>"))

    for number in range(1, len(examples) + 1):
        assert len({shown_first(number) for _ in range(3)}) == 1, "a reload shows the same order"
    for ex in examples:
        assert blind_order(7, ex.pk, a, b) == blind_order(7, ex.pk, b, a)  # the pair's order in the address
    per_person = [tuple(blind_order(u, ex.pk, a, b)[0].pk for ex in examples) for u in range(1, 6)]
    assert len(set(per_person)) > 1, "people see different orders"


def test_it_starts_at_the_first_example_not_rated_yet(world, alice_client):
    suite, (a, b) = two_runs(world, examples=6)
    examples = list(suite.examples.order_by("index"))
    for ex in examples[:2]:
        alice_client.post(rate_url(world, suite, a, b), {"example": ex.pk, "choice": "tie"})
    page = alice_client.get(blind_url(world, suite, a, b)).content.decode()
    assert f'name="example" value="{examples[2].pk}"' in page and "Example 3 of" in page


def test_the_tally_counts_each_pair_whatever_side_a_run_was_rated_on(world, alice_client):
    suite, (a, b) = two_runs(world, examples=6)
    ex = list(suite.examples.order_by("index"))
    user = world["user"]
    low, high = sorted((a, b), key=lambda r: r.pk)
    Rating.objects.create(
        run_a=low, run_b=high, example=ex[0], user=user, choice="a", pass_a=True, pass_b=False
    )
    Rating.objects.create(run_a=low, run_b=high, example=ex[1], user=user, choice="tie", blind=True)
    # Rated side by side with the runs the other way round: high as A, and A won.
    Rating.objects.create(
        run_a=high, run_b=low, example=ex[2], user=user, choice="a", pass_a=True, pass_b=True
    )
    from evals.views import pair_tallies

    [t] = pair_tallies(suite, {a.pk: a, b.pk: b})
    assert (t["first"], t["second"]) == (low, high)
    assert (t["wins_1"], t["ties"], t["wins_2"], t["n"], t["blind"]) == (1, 1, 1, 3, 1)
    assert (t["pass_1"], t["fail_1"], t["pass_2"], t["fail_2"]) == (2, 0, 1, 1)
    page = alice_client.get(reverse("side_by_side", args=[world["project"].slug, suite.pk]))
    assert 'id="pair-tally"' in page.content.decode() and "2 of 2 vs 1 of 2" in page.content.decode()


def test_bad_blind_ratings_are_a_400_and_nothing_is_stored(world, alice_client):
    suite, (a, b) = two_runs(world)
    ex = suite.examples.first()
    url = rate_url(world, suite, a, b)
    for data in (
        {"example": ex.pk, "choice": "both"},
        {"example": ex.pk},
        {"example": ex.pk, "choice": "a", "pass_a": "maybe"},
        {"example": ex.pk, "choice": "a", "note": "x" * 2001},
        {"example": "99999999999999999999", "choice": "a"},
        {"example": "abc", "choice": "a"},
    ):
        r = alice_client.post(url, data)
        assert r.status_code == 400, (data, r.status_code)
    same = reverse("blind_rate", args=[world["project"].slug, suite.pk]) + f"?a={a.pk}&b={a.pk}"
    assert alice_client.post(same, {"example": ex.pk, "choice": "a"}).status_code == 400
    forged = reverse("blind_rate", args=[world["project"].slug, suite.pk]) + f"?a=-1&b={b.pk}"
    assert alice_client.post(forged, {"example": ex.pk, "choice": "a"}).status_code == 400
    # The plain side-by-side rating of a run with itself is a 400 too, never a 500.
    rate = reverse("rate", args=[world["project"].slug, suite.pk]) + f"?a={a.pk}&b={a.pk}"
    assert alice_client.post(rate, {"example": ex.pk, "choice": "a"}).status_code == 400
    assert Rating.objects.count() == 0
    assert alice_client.get(blind_url(world, suite, a, b, page="zzz")).status_code == 200


def test_no_one_rates_or_sees_another_projects_runs(world, client, bob):
    suite, (a, b) = two_runs(world)
    client.force_login(bob)
    assert client.get(blind_url(world, suite, a, b)).status_code == 404
    r = client.post(rate_url(world, suite, a, b), {"example": suite.examples.first().pk, "choice": "a"})
    assert r.status_code == 404 and Rating.objects.count() == 0


# --- the dataset review queue keeps edits across pages ---------------------------------------


def test_the_review_queue_keeps_edits_across_pages(alice, alice_project, alice_client):
    rows = "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
        )
        + "\n"
        for i in range(25)
    )
    v1 = import_dataset(alice_project, alice, "answers", io.BytesIO(rows.encode()), filename="a.jsonl")
    url = reverse("dataset_review", args=[alice_project.slug, v1.dataset_id, v1.number])
    page1 = alice_client.get(url).content.decode()
    assert 'name="answer_0"' in page1 and 'name="answer_10"' not in page1
    # Going to the next page saves this page's edit first.
    r = alice_client.post(url + "?page=1", {"answer_0": "Edited on page one.", "goto": "2"})
    assert r.status_code == 302
    v2 = v1.dataset.latest
    assert v2.number == 2 and "page=2" in r["Location"]
    page2 = alice_client.get(r["Location"]).content.decode()
    assert 'name="answer_10"' in page2
    r = alice_client.post(r["Location"], {"answer_10": "Edited on page two.", "goto": "1"})
    v3 = v1.dataset.latest
    assert v3.number == 3 and "page=1" in r["Location"]
    back = alice_client.get(r["Location"]).content.decode()
    assert "Edited on page one." in back
    answers = {i: m[-1]["content"] for i, m in v3.rows.values_list("index", "messages")}
    assert (
        answers[0] == "Edited on page one." and answers[10] == "Edited on page two." and answers[5] == "A5."
    )


# --- the page in a real browser ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_blind_review_in_a_browser_with_keyboard_shortcuts(page, world):
    suite, (a, b) = two_runs(world, examples=4)
    EvalResult.objects.filter(run=a).update(output="Hello! Your order ships today and arrives on Friday.")
    EvalResult.objects.filter(run=b).update(output="It ships today.")
    problems = watch(page)
    log_in(page)
    page.goto(blind_url(world, suite, a, b, page=1))
    card = page.locator("#blind-card")
    assert card.get_by_text("model hidden until you rate").count() == 2
    assert page.locator("#kbd-legend").is_visible()
    # Typing in the note never rates: "1", "p" and "n" are just text there.
    page.get_by_placeholder("why (optional)").fill("")
    page.get_by_placeholder("why (optional)").type("1 pn: A is friendlier")
    assert Rating.objects.count() == 0 and card.get_by_text("model hidden until you rate").count() == 2
    page.locator("#blind-card .blind-query").click()  # out of the text box
    page.keyboard.press("p")
    page.keyboard.press("Shift+F")
    assert page.locator('input[name="pass_a"][value="pass"]').is_checked()
    assert page.locator('input[name="pass_b"][value="fail"]').is_checked()
    page.keyboard.press("1")
    page.locator("#blind-card .reveal").first.wait_for()
    rating = Rating.objects.get()
    ex = suite.examples.order_by("index").first()
    first, second = blind_order(world["user"].pk, ex.pk, a, b)
    assert rating.example == ex and rating.blind and rating.note == "1 pn: A is friendlier"
    assert rating.choice == (Rating.A if first == rating.run_a else Rating.B)
    assert {rating.run_a.pk: rating.pass_a, rating.run_b.pk: rating.pass_b} == {
        first.pk: True,
        second.pk: False,
    }
    assert page.locator("#side-a .reveal").get_attribute("data-run") == str(first.pk)
    Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.keyboard.press("n")
    page.wait_for_url("**page=2**")
    assert page.get_by_text("Example 2 of").is_visible()
    assert problems == [], problems
