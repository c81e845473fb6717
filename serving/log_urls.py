from django.urls import path

from serving import log_views

urlpatterns = [
    path("p/<slug:slug>/serving/requests", log_views.request_log, name="request_log"),
    path("p/<slug:slug>/serving/requests/capture", log_views.request_capture, name="request_capture"),
]
