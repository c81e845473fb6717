"""Migration 0011 reads the review state out of the old display flags once:
rows made the old way keep what review decided, as data."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = [pytest.mark.django_db(transaction=True)]

BEFORE = [("workbench", "0010_dataset_version_state")]
AFTER = [("workbench", "0011_row_review_state")]


def migrate(target):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(target)
    return executor


@pytest.fixture
def old_apps():
    executor = migrate(BEFORE)
    yield executor.loader.project_state(BEFORE).apps
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())


def test_it_fills_the_review_state_from_the_old_flags(old_apps):
    Project = old_apps.get_model("workbench", "Project")
    Dataset = old_apps.get_model("workbench", "Dataset")
    Version = old_apps.get_model("workbench", "DatasetVersion")
    Row = old_apps.get_model("workbench", "DatasetRow")
    dataset = Dataset.objects.create(project=Project.objects.create(name="P", slug="p"), name="d")
    version = Version.objects.create(dataset=dataset, number=1, kind="teacher", sha256="")
    old = [  # (flags, failing, curation) as the teacher and the review actions wrote them
        (['mentions "system prompt"', "fails rule: short"], ["short"], {}),  # not reviewed
        ([], ["short"], {}),  # "accept all" cleared the flags and kept the failure
        (["fails rule: opening"], ["opening"], {"edited": True}),  # edited, still failing
        ([], [], {"edited": True}),  # edited, passes now
        (["empty answer"], [], {}),
        (["fails rule: short"], [], {}),  # older than the failing field
    ]
    for index, (flags, failing, curation) in enumerate(old):
        Row.objects.create(
            version=version,
            index=index,
            messages=[],
            sha256="",
            flags=flags,
            failing=failing,
            curation=curation,
        )
    migrate(AFTER)
    from workbench.models import DatasetRow

    rows = list(DatasetRow.objects.order_by("index").values_list("notes", "failing", "review"))
    assert rows == [
        (['mentions "system prompt"'], ["short"], ""),
        ([], ["short"], "accepted"),
        ([], ["opening"], "edited"),
        ([], [], "edited"),
        (["empty answer"], [], ""),
        ([], ["short"], ""),
    ]
    # what the page shows and what trains are the same as before the migration
    shown = [r.flags for r in DatasetRow.objects.order_by("index")]
    assert shown == [flags for flags, _, _ in old[:5]] + [["fails rule: short"]]
    assert list(DatasetRow.objects.unresolved().order_by("index").values_list("index", flat=True)) == [
        0,
        2,
        5,
    ]
    assert list(DatasetRow.objects.flagged().order_by("index").values_list("index", flat=True)) == [
        0,
        2,
        4,
        5,
    ]
    # and back: the display flags are written again
    executor = migrate(BEFORE)
    Row = executor.loader.project_state(BEFORE).apps.get_model("workbench", "DatasetRow")
    assert [r.flags for r in Row.objects.order_by("index")] == shown
