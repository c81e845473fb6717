from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("serving", "0003_alias_max_skills_drop"),
    ]

    operations = [
        migrations.AddField(
            model_name="requestlog",
            name="request_id",
            field=models.CharField(blank=True, db_index=True, default="", max_length=40),
        ),
    ]
