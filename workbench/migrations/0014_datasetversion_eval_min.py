from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("workbench", "0013_promptversion_facts"),
    ]

    operations = [
        migrations.AddField(
            model_name="datasetversion",
            name="eval_min",
            field=models.PositiveIntegerField(
                default=0,
                help_text="The split holds out at least this many rows (at most half); 0: the percent alone",
            ),
        ),
    ]
