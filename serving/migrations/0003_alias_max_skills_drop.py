from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("serving", "0002_alias_fact_recall"),
    ]

    operations = [
        migrations.AddField(
            model_name="alias",
            name="max_skills_drop",
            field=models.FloatField(
                blank=True,
                help_text="Largest drop in general skills (student - floor, four-arm comparison) allowed (0-1)",
                null=True,
            ),
        ),
    ]
