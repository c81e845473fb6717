from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("serving", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="alias",
            name="min_fact_recall",
            field=models.FloatField(
                blank=True, help_text="Minimum fact recall of the candidate (0-1)", null=True
            ),
        ),
        migrations.AddField(
            model_name="alias",
            name="fact_recall_vs_teacher",
            field=models.BooleanField(
                default=False,
                help_text="The student's fact recall must be at least the prompted teacher's (four-arm comparison)",
            ),
        ),
    ]
