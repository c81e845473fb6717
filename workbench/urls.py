from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from workbench import views

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
    path("models/", views.models_page, name="models"),
    path("models/ping", views.ping_workers, name="ping_workers"),
    path("models/ping/<int:ping_id>", views.ping_status, name="ping_status"),
]
