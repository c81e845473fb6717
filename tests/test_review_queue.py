"""The review queue of curated teacher data: failing rows first, bulk
actions, and the data-quality report carried through human edits."""

import io
from pathlib import Path

import pytest
from django.urls import reverse

from engines.rules import validate_rules
from workbench import data_quality
from workbench.actions import ActionError
from workbench.actions.datasets import derive_version, import_dataset, review_bulk, review_version
from workbench.models import DatasetVersion

RULES = [
    {"name": "opening", "kind": "starts_with", "text": "hi."},
    {"name": "short", "kind": "max_words", "n": 5},
]


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path: Path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


@pytest.fixture
def teacher_version(alice, alice_project):
    upload = import_dataset(
        alice_project, alice, "q", io.BytesIO(b"".join(b"q%d\n" % i for i in range(6))), eval_percent=0
    )
    answers = [
        "hi. fine.",
        "hello there.",
        "hi. one two three four five six.",
        "nope, this is far too long.",
        "hi. ok.",
        "hi. yes.",
    ]
    rules = validate_rules(RULES)
    rows = []
    for row, answer in zip(upload.rows.order_by("index"), answers, strict=True):
        messages = [*row.messages, {"role": "assistant", "content": answer}]
        failing = data_quality.failing(rules, messages)
        rows.append(
            (
                row.index,
                messages,
                {"failing": failing, "curation": {"samples": 2, "picked": 1, "passed": [0, 2]}},
            )
        )
    quality = {
        "rule_names": ["opening", "short"],
        "steps": [data_quality.step("raw", answers, rules)],
        "settings": {"best_of": 2},
    }
    return derive_version(
        upload, alice, rows, kind=DatasetVersion.TEACHER, meta={"rules": RULES, "quality": quality}
    )


def test_the_report_counts_a_known_dataset(teacher_version):
    step = teacher_version.meta["quality"]["steps"][0]
    # opening fails on rows 1 and 3; short fails on rows 2 and 3: 3 of 6 pass both.
    assert step == {"step": "raw", "rows": 6, "all_rules": 0.5, "rules": {"opening": 4 / 6, "short": 4 / 6}}


def test_failing_rows_come_first_and_show_how_they_were_made(alice_client, alice_project, teacher_version):
    url = reverse(
        "dataset_review", args=[alice_project.slug, teacher_version.dataset_id, teacher_version.number]
    )
    page = alice_client.get(url).content.decode()
    order = [page.index(f"#{i}") for i in (2, 3, 4, 1, 5, 6)]
    assert order == sorted(order)
    assert "3 rows still fail a rule" in page and "sample 2 of 2" in page
    assert "Data quality" in page
    only = alice_client.get(url + "?rule=short").content.decode()
    assert "#3 " in only and "#4 " in only and "#2 " not in only


def test_drop_all_failing_one_rule(alice, alice_client, alice_project, teacher_version):
    url = reverse(
        "dataset_review", args=[alice_project.slug, teacher_version.dataset_id, teacher_version.number]
    )
    r = alice_client.post(url, {"bulk": "drop_failing", "rule": "short"})
    assert r.status_code == 302
    new = DatasetVersion.objects.get(dataset=teacher_version.dataset, number=teacher_version.number + 1)
    assert new.row_count == 4 and new.meta["dropped"] == [2, 3]
    assert sorted(sum(new.rows.values_list("failing", flat=True), [])) == ["opening"]
    human = new.meta["quality"]["steps"][-1]
    assert human["step"] == "human edits" and human["rules"]["short"] == 1.0 and human["all_rules"] == 0.75
    with pytest.raises(ActionError, match="No row fails"):
        review_bulk(new, alice, "drop_failing", "short")
    with pytest.raises(ActionError, match="no rule called"):
        review_bulk(new, alice, "drop_failing", "nonsense")


def test_accept_all_clears_the_warnings_but_keeps_the_facts(alice, teacher_version):
    new = review_bulk(teacher_version, alice, "accept_all")
    assert new.rows.flagged().count() == 0 and new.rows.unresolved().count() == 0
    assert new.rows.exclude(failing=[]).count() == 3 and set(new.rows.values_list("review", flat=True)) == {
        "accepted"
    }
    assert all(row.flags == [] for row in new.rows.all())
    assert new.rows.first().curation["samples"] == 2


def test_an_edit_is_checked_again(alice, teacher_version):
    new = review_version(teacher_version, alice, {1: "hi. fixed."}, set())
    row = new.rows.get(index=1)
    assert row.failing == [] and row.flags == [] and row.curation["edited"] is True and row.review == "edited"
    assert new.meta["quality"]["steps"][-1]["rules"]["opening"] == 5 / 6


def test_an_answer_that_starts_with_a_newline_is_not_an_edit(alice_client, alice_project, teacher_version):
    """HTML drops one newline after <textarea>: the page must write one, or
    a browser posts the answer without its leading newline as an edit."""
    row = teacher_version.rows.get(index=0)
    teacher_version.rows.filter(pk=row.pk).update(
        messages=[*row.messages[:-1], {"role": "assistant", "content": "\nhi. fine."}]
    )
    url = reverse(
        "dataset_review", args=[alice_project.slug, teacher_version.dataset_id, teacher_version.number]
    )
    page = alice_client.get(url).content.decode()
    assert 'name="answer_0" rows="4">\n\nhi. fine.</textarea>' in page


def test_a_stray_carriage_return_is_not_an_edit(alice_client, alice_project, teacher_version):
    """A browser turns CR and CR LF into LF inside <textarea> and posts CR LF:
    posting back what the page showed changes nothing; a real edit still does."""
    for index, content in ((0, "hi.\rfine."), (1, "hi.\r\nthere.")):
        row = teacher_version.rows.get(index=index)
        teacher_version.rows.filter(pk=row.pk).update(
            messages=[*row.messages[:-1], {"role": "assistant", "content": content}]
        )
    url = reverse(
        "dataset_review", args=[alice_project.slug, teacher_version.dataset_id, teacher_version.number]
    )
    as_posted = {"answer_0": "hi.\r\nfine.", "answer_1": "hi.\r\nthere."}
    before = teacher_version.dataset.versions.count()
    r = alice_client.post(url, as_posted)
    assert r.status_code == 302 and teacher_version.dataset.versions.count() == before
    r = alice_client.post(url, {**as_posted, "answer_1": "hi. there."})
    new = teacher_version.dataset.versions.order_by("-number").first()
    assert r.status_code == 302 and new.meta["edited"] == [1]


def test_the_fine_tune_learns_only_from_answers_that_pass_while_enough_do(
    alice, teacher_version, monkeypatch
):
    from jobs.runners import finetune

    monkeypatch.setattr(finetune, "MIN_PASSING_ROWS", 2)
    examples, left_out = finetune.training_examples(teacher_version, "SYS", passing_only=True)
    assert [e["answer"] for e in examples] == ["hi. fine.", "hi. ok.", "hi. yes."] and left_out == 3
    assert all(e["system_prompt"] == "SYS" for e in examples)
    everything, none = finetune.training_examples(teacher_version, "SYS")
    assert len(everything) == 6 and none == 0
    monkeypatch.setattr(finetune, "MIN_PASSING_ROWS", 4)  # too few pass: it learns from all of them
    assert finetune.training_examples(teacher_version, "SYS", passing_only=True)[1] == 0
    monkeypatch.setattr(finetune, "MIN_PASSING_ROWS", 2)
    accepted = review_bulk(teacher_version, alice, "accept_all")  # accepted in review: learned from
    assert finetune.training_examples(accepted, "SYS", passing_only=True)[1] == 0


def test_a_rule_filter_over_more_rows_than_sqlite_has_query_variables(
    alice_client, alice_project, teacher_version
):
    """40,000 failing rows: a list of their ids passed SQLite's 32,766-variable limit."""
    from workbench.models import DatasetRow

    version = DatasetVersion.objects.create(
        dataset=teacher_version.dataset,
        number=9,
        kind=DatasetVersion.TEACHER,
        meta={"rules": RULES},
        row_count=40_000,
        sha256="",
    )
    answer = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "far too many words in this one"},
    ]
    DatasetRow.objects.bulk_create(
        (
            DatasetRow(
                version=version,
                index=i,
                messages=answer,
                sha256=str(i),
                failing=["short"] if i % 4 else ["opening", "short"],
            )
            for i in range(40_000)
        ),
        batch_size=2000,
    )
    url = reverse("dataset_review", args=[alice_project.slug, version.dataset_id, version.number])
    r = alice_client.get(url + "?rule=opening")
    assert r.status_code == 200
    page = r.content.decode()
    assert "40,000 rows still fail a rule" in page and "page 1 of 1000" in page  # 10,000 fail "opening"
    assert ">10,000<" in page and ">40,000<" in page  # the counts per rule, in SQL
    assert "#1 " in page and "#2 " not in page and "#5 " in page
    assert "page 1 of 4000" in alice_client.get(url + "?rule=short").content.decode()
    assert "No rows here" in alice_client.get(url + "?rule=nope").content.decode()


@pytest.fixture
def long_version(alice, alice_project):
    upload = import_dataset(
        alice_project, alice, "long", io.BytesIO(b"".join(b"q%d\n" % i for i in range(25))), eval_percent=0
    )
    rows = [
        (r.index, [*r.messages, {"role": "assistant", "content": f"answer {r.index}"}])
        for r in upload.rows.order_by("index")
    ]
    return derive_version(upload, alice, rows, kind=DatasetVersion.TEACHER)


def test_edits_on_one_page_are_kept_when_the_reviewer_moves_to_another(
    alice_client, alice_project, long_version
):
    url = reverse("dataset_review", args=[alice_project.slug, long_version.dataset_id, long_version.number])
    page = alice_client.get(url).content.decode()
    # moving on is a submit of the page's edits, and leaving with unsaved edits warns
    assert 'name="goto" value="2"' in page and "beforeunload" in page
    r = alice_client.post(url + "?page=1", {"answer_0": "edited on page 1", "drop": "3", "goto": "2"})
    second = DatasetVersion.objects.get(number=long_version.number + 1)
    assert (
        r.status_code == 302
        and r["Location"]
        == reverse("dataset_review", args=[alice_project.slug, second.dataset_id, second.number]) + "?page=2"
    )
    page2 = alice_client.get(r["Location"]).content.decode()
    assert "page 2 of 3" in page2 and "answer 11" in page2  # row 3 was dropped: page 2 starts at row 11
    r = alice_client.post(r["Location"], {"answer_15": "edited on page 2"})
    assert r.status_code == 302
    final = DatasetVersion.objects.get(number=long_version.number + 2)
    answers = {i: m[-1]["content"] for i, m in final.rows.values_list("index", "messages")}
    assert final.row_count == 24 and "answer 3" not in answers.values()
    assert "edited on page 1" in answers.values() and "edited on page 2" in answers.values()
    # no edits, just moving on: no new version
    r = alice_client.post(r["Location"], {"goto": "3"})
    assert r.status_code == 302 and r["Location"].endswith("?page=3")
    assert DatasetVersion.objects.filter(dataset=long_version.dataset).count() == 4


def test_rules_that_no_longer_validate_stop_review_instead_of_passing_every_answer(
    alice, alice_client, alice_project, teacher_version, caplog
):
    """Invalid stored rules used to read as "no rules": an edit was then
    checked against nothing and saved as passing."""
    meta = {**teacher_version.meta, "rules": [{"name": "gone", "kind": "no_such_kind"}]}
    DatasetVersion.objects.filter(pk=teacher_version.pk).update(meta=meta)
    teacher_version.refresh_from_db()
    with pytest.raises(data_quality.StoredRulesError, match="no longer valid"):
        data_quality.rules_of(teacher_version)
    assert "are invalid" in caplog.text
    with pytest.raises(ActionError, match="no longer valid"):
        review_version(teacher_version, alice, {1: "still no greeting"}, set())
    with pytest.raises(ActionError, match="no longer valid"):
        review_bulk(teacher_version, alice, "accept_all")
    url = reverse(
        "dataset_review", args=[alice_project.slug, teacher_version.dataset_id, teacher_version.number]
    )
    page = alice_client.get(url)
    assert page.status_code == 200 and "no longer valid" in page.content.decode()
    assert teacher_version.dataset.versions.count() == 2  # the upload and the teacher answers: nothing saved


def test_one_count_of_failing_rows_per_rule(teacher_version):
    counts = data_quality.failing_counts(teacher_version.rows.all(), ["opening", "short", "unknown"])
    assert (counts.rows, counts.failing, counts.by_rule) == (6, 3, {"opening": 2, "short": 2, "unknown": 0})
    assert counts.share == 0.5
    assert data_quality.failing_share(teacher_version) == data_quality.failing_counts(  # all rows train here
        teacher_version.rows.all(), ["opening", "short"]
    )
    assert "50% of the training answers" in data_quality.warning(teacher_version, 0.2)
    assert data_quality.warning(teacher_version, 0.5) is None
