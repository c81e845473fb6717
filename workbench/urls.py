from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from workbench import views, views_datasets, views_prompts

urlpatterns = [
    path("", views.project_list, name="project_list"),
    path("healthz", views.healthz, name="healthz"),
    path("login/", auth_views.LoginView.as_view(template_name="registration/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("projects/new", views.project_create, name="project_create"),
    path("p/<slug:slug>/", views.project_detail, name="project_detail"),
    path("p/<slug:slug>/members/add", views.member_add, name="member_add"),
    path("p/<slug:slug>/members/<int:membership_id>/remove", views.member_remove, name="member_remove"),
    path("p/<slug:slug>/prompts/", views_prompts.prompt_list, name="prompt_list"),
    path("p/<slug:slug>/prompts/new", views_prompts.prompt_create, name="prompt_create"),
    path("p/<slug:slug>/prompts/rule-params", views_prompts.rule_params, name="rule_params"),
    path("p/<slug:slug>/prompts/<int:prompt_id>/", views_prompts.prompt_detail, name="prompt_detail"),
    path("p/<slug:slug>/prompts/<int:prompt_id>/v<int:number>", views_prompts.prompt_version, name="prompt_version"),
    path("p/<slug:slug>/prompts/<int:prompt_id>/save", views_prompts.prompt_save, name="prompt_save"),
    path("p/<slug:slug>/prompts/<int:prompt_id>/rules", views_prompts.prompt_rules, name="prompt_rules"),
    path("p/<slug:slug>/prompts/<int:prompt_id>/diff", views_prompts.prompt_diff, name="prompt_diff"),
    path("p/<slug:slug>/datasets/", views_datasets.dataset_list, name="dataset_list"),
    path("p/<slug:slug>/datasets/upload", views_datasets.dataset_upload, name="dataset_upload"),
    path("p/<slug:slug>/datasets/<int:dataset_id>/", views_datasets.dataset_detail, name="dataset_detail"),
    path("p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>", views_datasets.dataset_version,
         name="dataset_version"),
    path("p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>/review", views_datasets.dataset_review,
         name="dataset_review"),
    path("p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>/stats", views_datasets.dataset_stats,
         name="dataset_stats"),
    path("p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>/stats-fragment",
         views_datasets.dataset_stats_fragment, name="dataset_stats_fragment"),
    path("p/<slug:slug>/datasets/<int:dataset_id>/v<int:number>/export.jsonl", views_datasets.dataset_export,
         name="dataset_export"),
    path("", include("jobs.urls")),
    path("models/", views.models_page, name="models"),
    path("models/ping", views.ping_workers, name="ping_workers"),
    path("models/ping/<int:ping_id>", views.ping_status, name="ping_status"),
]
