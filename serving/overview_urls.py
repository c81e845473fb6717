from django.urls import path

from serving import overview

# Fragments the workbench's pages load with htmx (the project dashboard, Models & serving).
urlpatterns = [
    path("p/<slug:slug>/overview/panels", overview.overview_panels, name="overview_panels"),
    path("p/<slug:slug>/overview/jobs", overview.overview_jobs, name="overview_jobs"),
    path("p/<slug:slug>/overview/engine", overview.overview_engine, name="overview_engine"),
    path("models/engine", overview.engine_status, name="engine_status"),
]
