from django.urls import path

from evals import views

urlpatterns = [
    path("p/<slug:slug>/evals/", views.evals_home, name="evals_home"),
    path("p/<slug:slug>/evals/suites/new", views.suite_create, name="suite_create"),
    path("p/<slug:slug>/evals/runs/new", views.runs_start, name="runs_start"),
    path("p/<slug:slug>/evals/suites/<int:suite_id>/", views.suite_detail, name="suite_detail"),
    path("p/<slug:slug>/evals/suites/<int:suite_id>/side-by-side", views.side_by_side, name="side_by_side"),
    path("p/<slug:slug>/evals/suites/<int:suite_id>/rate", views.rate, name="rate"),
    path("p/<slug:slug>/evals/suites/<int:suite_id>/blind", views.blind_review, name="blind_review"),
    path("p/<slug:slug>/evals/suites/<int:suite_id>/blind/rate", views.blind_rate, name="blind_rate"),
    path("p/<slug:slug>/evals/runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("p/<slug:slug>/evals/comparisons/new", views.comparison_start, name="comparison_start"),
    path(
        "p/<slug:slug>/evals/comparisons/<int:comparison_id>/",
        views.comparison_detail,
        name="comparison_detail",
    ),
]
