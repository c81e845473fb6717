from django.urls import path

from jobs import curves, views

urlpatterns = [
    path("p/<slug:slug>/jobs/", views.job_list, name="job_list"),
    path("p/<slug:slug>/jobs/absorb", views.absorb_start, name="absorb_start"),
    path("p/<slug:slug>/jobs/synthesize", views.synthesize, name="synthesize"),
    path("p/<slug:slug>/jobs/curves/", curves.curves, name="job_curves"),
    path("p/<slug:slug>/jobs/presets/save", views.preset_save, name="absorb_preset_save"),
    path(
        "p/<slug:slug>/jobs/presets/<int:preset_id>/delete", views.preset_delete, name="absorb_preset_delete"
    ),
    path("p/<slug:slug>/jobs/<int:job_id>/", views.job_detail, name="job_detail"),
    path("p/<slug:slug>/jobs/<int:job_id>/status.json", views.job_status, name="job_status"),
    path("p/<slug:slug>/jobs/<int:job_id>/cancel", views.job_cancel, name="job_cancel"),
    path("p/<slug:slug>/jobs/<int:job_id>/retry", views.job_retry, name="job_retry"),
    path("p/<slug:slug>/teachers/", views.teacher_endpoints, name="teacher_endpoints"),
    path(
        "p/<slug:slug>/teachers/<int:endpoint_id>/delete",
        views.teacher_endpoint_delete,
        name="teacher_endpoint_delete",
    ),
    path("p/<slug:slug>/variants/<int:variant_id>/", views.variant_detail, name="variant_detail"),
]
