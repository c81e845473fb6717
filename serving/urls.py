from django.urls import path

from serving import views

# Every name starts with "serving" (the project nav marks the Serving tab by it).
urlpatterns = [
    path("p/<slug:slug>/serving/", views.serving_home, name="serving_home"),
    path("p/<slug:slug>/serving/aliases/new", views.alias_create, name="serving_alias_create"),
    path("p/<slug:slug>/serving/aliases/<slug:alias_name>/", views.alias_detail, name="serving_alias"),
    path("p/<slug:slug>/serving/aliases/<slug:alias_name>/gate", views.alias_gate, name="serving_alias_gate"),
    path(
        "p/<slug:slug>/serving/aliases/<slug:alias_name>/rollback",
        views.alias_rollback,
        name="serving_alias_rollback",
    ),
    path("p/<slug:slug>/serving/promote", views.promote, name="serving_promote"),
    path("p/<slug:slug>/serving/variants/", views.variant_list, name="serving_variants"),
    path("p/<slug:slug>/serving/keys/", views.api_keys, name="serving_keys"),
    path("p/<slug:slug>/serving/keys/<int:key_id>/revoke", views.api_key_revoke, name="serving_key_revoke"),
]
