"""Rows get an explicit review state: `flags` (display strings, some of them
"fails rule: <name>") becomes `notes` (the warnings that are not rules), and
`review` records what a reviewer did, read from the old flags once here."""

from django.db import migrations, models

FAILS = "fails rule: "


def from_flags(apps, schema_editor):
    Row = apps.get_model("workbench", "DatasetRow")
    changed = []
    rows = Row.objects.exclude(notes=[]) | Row.objects.exclude(failing=[]) | Row.objects.exclude(curation={})
    for row in rows.only("pk", "notes", "failing", "curation").iterator(chunk_size=2000):
        flags = row.notes or []
        named = [f[len(FAILS) :] for f in flags if f.startswith(FAILS)]
        notes = [f for f in flags if not f.startswith(FAILS)]
        failing = row.failing or named
        if failing and not named:
            review = "accepted"  # "accept all" cleared the warnings and kept the failures
        elif (row.curation or {}).get("edited"):
            review = "edited"
        else:
            review = ""
        if (notes, failing, review) != (flags, row.failing, ""):
            row.notes, row.failing, row.review = notes, failing, review
            changed.append(row)
        if len(changed) >= 2000:
            Row.objects.bulk_update(changed, ["notes", "failing", "review"])
            changed = []
    Row.objects.bulk_update(changed, ["notes", "failing", "review"])


def to_flags(apps, schema_editor):
    Row = apps.get_model("workbench", "DatasetRow")
    changed = []
    for row in (
        Row.objects.exclude(notes=[], failing=[])
        .only("pk", "notes", "failing", "review")
        .iterator(chunk_size=2000)
    ):
        row.notes = [] if row.review == "accepted" else [*row.notes, *(FAILS + n for n in row.failing)]
        changed.append(row)
        if len(changed) >= 2000:
            Row.objects.bulk_update(changed, ["notes"])
            changed = []
    Row.objects.bulk_update(changed, ["notes"])


class Migration(migrations.Migration):
    dependencies = [
        ("workbench", "0010_dataset_version_state"),
    ]

    operations = [
        migrations.RenameField(model_name="datasetrow", old_name="flags", new_name="notes"),
        migrations.AlterField(
            model_name="datasetrow",
            name="notes",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="Warnings about the answer other than rules: prompt leaks, empty, cut off",
            ),
        ),
        migrations.AddField(
            model_name="datasetrow",
            name="review",
            field=models.CharField(
                blank=True,
                choices=[("", "Not reviewed"), ("edited", "Edited"), ("accepted", "Accepted as it is")],
                default="",
                help_text="What a reviewer did: edited the answer, or accepted it as it is",
                max_length=10,
            ),
        ),
        migrations.RunPython(from_flags, to_flags),
    ]
