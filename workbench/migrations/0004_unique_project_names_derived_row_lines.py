"""Data fixes before the schema change in 0005.

1. Project names become unique, ignoring case (0005 adds the constraint):
   the oldest project keeps its name, each later duplicate gets " (2)",
   " (3)"... (a suffix no other project uses).
2. Rows of derived dataset versions (teacher answers, reviews) stored their
   parent row's index where the source line belongs: each gets the line of the
   parent row it came from. Parents are fixed before their children, so a
   review of teacher answers gets the upload's lines too.
"""

from django.db import migrations

BATCH = 2000


def rename_duplicate_projects(apps, schema_editor):
    Project = apps.get_model("workbench", "Project")
    max_length = Project._meta.get_field("name").max_length
    taken = {name.lower() for name in Project.objects.values_list("name", flat=True)}
    seen: set[str] = set()
    for project in Project.objects.order_by("created_at", "pk"):
        key = project.name.lower()
        if key not in seen:
            seen.add(key)
            continue
        n = 2
        while True:
            suffix = f" ({n})"
            candidate = project.name[: max_length - len(suffix)] + suffix
            if candidate.lower() not in taken:
                break
            n += 1
        taken.add(candidate.lower())
        seen.add(candidate.lower())
        Project.objects.filter(pk=project.pk).update(name=candidate)


def derived_rows_take_their_source_line(apps, schema_editor):
    DatasetVersion = apps.get_model("workbench", "DatasetVersion")
    DatasetRow = apps.get_model("workbench", "DatasetRow")
    derived = DatasetVersion.objects.filter(parent__isnull=False).order_by("dataset_id", "number")
    for version in derived.iterator():
        parent_line = dict(
            DatasetRow.objects.filter(version_id=version.parent_id).values_list("index", "line")
        )
        batch = []
        for row in DatasetRow.objects.filter(version=version).only("pk", "line").iterator(chunk_size=BATCH):
            # The stored value is the parent row's index.
            row.line = parent_line.get(row.line, 0)
            batch.append(row)
            if len(batch) >= BATCH:
                DatasetRow.objects.bulk_update(batch, ["line"])
                batch = []
        if batch:
            DatasetRow.objects.bulk_update(batch, ["line"])


class Migration(migrations.Migration):
    dependencies = [
        ("workbench", "0003_variants"),
    ]

    operations = [
        migrations.RunPython(rename_duplicate_projects, migrations.RunPython.noop),
        migrations.RunPython(derived_rows_take_their_source_line, migrations.RunPython.noop),
    ]
