from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0002_lifecycle"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="form_token",
            field=models.UUIDField(blank=True, editable=False, null=True),
        ),
        migrations.AddConstraint(
            model_name="job",
            constraint=models.UniqueConstraint(
                fields=("project", "form_token"), name="unique_job_form_token"
            ),
        ),
    ]
