from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("workbench", "0012_rename_basemodel_foundationmodel"),
    ]

    operations = [
        migrations.AddField(
            model_name="promptversion",
            name="facts",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="Facts checks (engines.facts format): what answers must state",
            ),
        ),
    ]
