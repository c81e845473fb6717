from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from workbench.views import datasets, models, projects, prompts

urlpatterns = [
    path("", projects.project_list, name="project_list"),
    path("healthz", models.healthz, name="healthz"),
    path("login/", auth_views.LoginView.as_view(template_name="registration/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("projects/new", projects.project_create, name="project_create"),
    path("p/<slug:slug>/", projects.project_detail, name="project_detail"),
    path("p/<slug:slug>/members/add", projects.member_add, name="member_add"),
    path("p/<slug:slug>/members/<int:membership_id>/remove", projects.member_remove, name="member_remove"),
    path("p/<slug:slug>/prompts/", prompts.prompt_list, name="prompt_list"),
    path("p/<slug:slug>/prompts/new", prompts.prompt_create, name="prompt_create"),
    path("p/<slug:slug>/prompts/rule-params", prompts.rule_params, name="rule_params"),
    path("p/<slug:slug>/prompts/<int:prompt_id>/", prompts.prompt_detail, name="prompt_detail"),
    path(
        "p/<slug:slug>/prompts/<int:prompt_id>/v<int:number>", prompts.prompt_version, name="prompt_version"
    ),
    path("p/<slug:slug>/prompts/<int:prompt_id>/save", prompts.prompt_save, name="prompt_save"),
    path(
        "p/<slug:slug>/prompts/<int:prompt_id>/v<int:number>/restore",
        prompts.prompt_restore,
        name="prompt_restore",
    ),
    path("p/<slug:slug>/prompts/<int:prompt_id>/rules", prompts.prompt_rules, name="prompt_rules"),
    path(
        "p/<slug:slug>/prompts/<int:prompt_id>/rules/remove",
        prompts.prompt_rule_remove,
        name="prompt_rule_remove",
    ),
    path("p/<slug:slug>/prompts/<int:prompt_id>/diff", prompts.prompt_diff, name="prompt_diff"),
    path("p/<slug:slug>/prompts/<int:prompt_id>/facts", prompts.prompt_facts, name="prompt_facts"),
    path(
        "p/<slug:slug>/prompts/<int:prompt_id>/facts/propose",
        prompts.prompt_facts_propose,
        name="prompt_facts_propose",
    ),
    path(
        "p/<slug:slug>/prompts/<int:prompt_id>/facts/add", prompts.prompt_facts_add, name="prompt_facts_add"
    ),
    path("p/<slug:slug>/datasets/", datasets.dataset_list, name="dataset_list"),
    path("p/<slug:slug>/datasets/upload", datasets.dataset_upload, name="dataset_upload"),
    path("p/<slug:slug>/datasets/<int:dataset_id>/", datasets.dataset_detail, name="dataset_detail"),
    path(
        "p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>",
        datasets.dataset_version,
        name="dataset_version",
    ),
    path(
        "p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>/review",
        datasets.dataset_review,
        name="dataset_review",
    ),
    path(
        "p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>/stats",
        datasets.dataset_stats,
        name="dataset_stats",
    ),
    path(
        "p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>/stats-fragment",
        datasets.dataset_stats_fragment,
        name="dataset_stats_fragment",
    ),
    path(
        "p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>/export.jsonl",
        datasets.dataset_export,
        name="dataset_export",
    ),
    path("", include("jobs.urls")),
    path("", include("evals.urls")),
    path("", include("serving.urls")),
    path("", include("serving.export_urls")),
    path("", include("serving.log_urls")),
    path("", include("serving.playground_urls")),
    path("", include("serving.overview_urls")),
    path("v1/", include("serving.api_urls")),
    # "/v1" itself too: the API answers every path in JSON (no slash redirect, no HTML 404).
    # (\Z, not $: an include ending in $ is a system check warning.)
    re_path(r"^v1\Z", include("serving.api_urls")),
    path("models/", models.models_page, name="models"),
    path("models/register", models.model_register, name="model_register"),
    path("models/ping", models.ping_workers, name="ping_workers"),
    path("models/ping/<int:ping_id>", models.ping_status, name="ping_status"),
]
