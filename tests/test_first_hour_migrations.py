"""The data migration that comes with unique project names and the source
lines of derived dataset rows, run on a database from before it."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = [pytest.mark.django_db(transaction=True)]

BEFORE = [("workbench", "0003_variants")]
AFTER = [("workbench", "0005_prompt_token_counts_unique_project_names")]


@pytest.fixture
def old_apps():
    """The models as they were at 0003, on a database migrated back to it;
    migrated forward to the latest state afterwards."""
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    executor.loader.build_graph()
    yield executor.loader.project_state(BEFORE).apps
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())


def migrate_forward() -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(AFTER)


def test_it_renames_duplicate_project_names_before_making_them_unique(old_apps):
    Project = old_apps.get_model("workbench", "Project")
    names = ["Support", "support", "Other", "SUPPORT", "Support (2)", "x" * 100, "X" * 100]
    for i, name in enumerate(names):
        Project.objects.create(name=name, slug=f"p{i}")
    migrate_forward()
    from workbench.models import Project as NewProject

    renamed = list(NewProject.objects.order_by("slug").values_list("name", flat=True))
    # the oldest keeps its name; a suffix already taken is skipped
    assert renamed == [
        "Support",
        "support (3)",
        "Other",
        "SUPPORT (4)",
        "Support (2)",
        "x" * 100,
        "X" * 96 + " (2)",
    ]
    assert len({n.lower() for n in renamed}) == len(renamed)


def test_it_gives_derived_rows_the_line_of_the_row_they_came_from(old_apps):
    Project = old_apps.get_model("workbench", "Project")
    Dataset = old_apps.get_model("workbench", "Dataset")
    Version = old_apps.get_model("workbench", "DatasetVersion")
    Row = old_apps.get_model("workbench", "DatasetRow")
    dataset = Dataset.objects.create(project=Project.objects.create(name="P", slug="p"), name="d")
    upload = Version.objects.create(dataset=dataset, number=1, sha256="")
    for index, line in enumerate([1, 3, 4]):  # a blank line 2 in the upload
        Row.objects.create(version=upload, index=index, line=line, messages=[], sha256="")
    # as the teacher stored them: the parent row's index where the line belongs
    teacher = Version.objects.create(dataset=dataset, number=2, parent=upload, kind="teacher", sha256="")
    for index, parent_index in enumerate([2, 0]):
        Row.objects.create(version=teacher, index=index, line=parent_index, messages=[], sha256="")
    review = Version.objects.create(dataset=dataset, number=3, parent=teacher, kind="edit", sha256="")
    Row.objects.create(version=review, index=0, line=1, messages=[], sha256="")  # teacher row 1
    migrate_forward()

    def lines(version_id: int) -> list[int]:
        return list(
            Row.objects.filter(version_id=version_id).order_by("index").values_list("line", flat=True)
        )

    assert (lines(upload.pk), lines(teacher.pk), lines(review.pk)) == ([1, 3, 4], [4, 1], [1])
