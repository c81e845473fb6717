from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("evals", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="evalsuite",
            name="facts",
            field=models.JSONField(
                blank=True, default=list, help_text="Facts checks (copied from the prompt version)"
            ),
        ),
    ]
