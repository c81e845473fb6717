import decimal

import django.core.validators
import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

import jobs.models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0003_form_token"),
        ("workbench", "0012_rename_basemodel_foundationmodel"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="TeacherEndpoint",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.CharField(max_length=100)),
                (
                    "base_url",
                    models.CharField(
                        help_text="The server's root or its /v1 URL (http or https), e.g. http://vllm:8000/v1.",
                        max_length=500,
                        validators=[jobs.models.validate_base_url],
                    ),
                ),
                ("model", models.CharField(help_text="The model name the endpoint serves.", max_length=200)),
                (
                    "api_key_env",
                    models.CharField(
                        blank=True,
                        help_text="The NAME of the environment variable that holds the API key on the workers "
                        "(the key itself is never stored). Empty: no key is sent.",
                        max_length=128,
                        validators=[jobs.models.validate_env_name],
                    ),
                ),
                (
                    "max_concurrency",
                    models.PositiveSmallIntegerField(
                        default=8,
                        help_text="Requests in flight at once (1-64).",
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(64),
                        ],
                    ),
                ),
                (
                    "price_input_per_million",
                    models.DecimalField(
                        blank=True,
                        decimal_places=4,
                        help_text="Price per million input (prompt) tokens, for the cost shown on jobs.",
                        max_digits=12,
                        null=True,
                        validators=[django.core.validators.MinValueValidator(decimal.Decimal("0"))],
                    ),
                ),
                (
                    "price_output_per_million",
                    models.DecimalField(
                        blank=True,
                        decimal_places=4,
                        help_text="Price per million output (completion) tokens.",
                        max_digits=12,
                        null=True,
                        validators=[django.core.validators.MinValueValidator(decimal.Decimal("0"))],
                    ),
                ),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "created_by",
                    models.ForeignKey(
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                (
                    "project",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="teacher_endpoints",
                        to="workbench.project",
                    ),
                ),
            ],
            options={
                "ordering": ["name"],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("project", "name"),
                        name="unique_teacher_endpoint_name",
                        violation_error_message="This project already has a teacher endpoint of that name.",
                    )
                ],
            },
        ),
        migrations.AddField(
            model_name="job",
            name="teacher_endpoint",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="jobs",
                to="jobs.teacherendpoint",
            ),
        ),
    ]
