from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("workbench", "0011_row_review_state"),
        ("jobs", "0003_form_token"),
        ("evals", "0001_initial"),
        ("serving", "0001_initial"),
    ]

    operations = [
        migrations.RenameModel(old_name="BaseModel", new_name="FoundationModel"),
    ]
