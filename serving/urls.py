from django.urls import path

from serving import cost_views, pareto, views
from serving.pipeline import pages as spec_pages
from serving.pipeline import views as pipeline_views

# Every name starts with "serving" (the project nav marks the Serving tab by it).
urlpatterns = [
    path("p/<slug:slug>/serving/", views.serving_home, name="serving_home"),
    # A fragment of the absorb form (jobs): its command line, spec and time estimate.
    path(
        "p/<slug:slug>/serving/absorb-preview",
        pipeline_views.absorb_preview,
        name="serving_absorb_preview",
    ),
    # Apply a spec from the browser (manage.py apply's plan and run), and follow each run.
    path("p/<slug:slug>/serving/specs/", spec_pages.spec_page, name="serving_specs"),
    path("p/<slug:slug>/serving/specs/schema.json", spec_pages.spec_schema, name="serving_spec_schema"),
    path("p/<slug:slug>/serving/specs/<int:run_id>/", spec_pages.spec_run, name="serving_spec_run"),
    path(
        "p/<slug:slug>/serving/specs/<int:run_id>/advance",
        spec_pages.spec_run_advance,
        name="serving_spec_run_advance",
    ),
    path("p/<slug:slug>/serving/aliases/new", views.alias_create, name="serving_alias_create"),
    path("p/<slug:slug>/serving/aliases/<slug:alias_name>/", views.alias_detail, name="serving_alias"),
    path("p/<slug:slug>/serving/aliases/<slug:alias_name>/gate", views.alias_gate, name="serving_alias_gate"),
    path(
        "p/<slug:slug>/serving/aliases/<slug:alias_name>/logging",
        views.alias_logging,
        name="serving_alias_logging",
    ),
    path(
        "p/<slug:slug>/serving/aliases/<slug:alias_name>/deployment",
        views.alias_deployment,
        name="serving_alias_deployment",
    ),
    path(
        "p/<slug:slug>/serving/aliases/<slug:alias_name>/rollback",
        views.alias_rollback,
        name="serving_alias_rollback",
    ),
    path("p/<slug:slug>/serving/promote", views.promote, name="serving_promote"),
    path("p/<slug:slug>/serving/variants/", views.variant_list, name="serving_variants"),
    path("p/<slug:slug>/serving/prompts/<int:prompt_id>/pareto/", pareto.pareto, name="serving_pareto"),
    path(
        "p/<slug:slug>/serving/comparisons/<int:comparison_id>/costs/",
        cost_views.comparison_costs,
        name="serving_comparison_costs",
    ),
    path("p/<slug:slug>/serving/keys/", views.api_keys, name="serving_keys"),
    path("p/<slug:slug>/serving/keys/<int:key_id>/revoke", views.api_key_revoke, name="serving_key_revoke"),
]
