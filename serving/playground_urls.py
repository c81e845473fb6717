from django.urls import path

from serving import playground_views

# Every name starts with "playground" (the project nav marks the Playground tab by it).
urlpatterns = [
    path("p/<slug:slug>/playground/", playground_views.playground_page, name="playground"),
    path("p/<slug:slug>/playground/stream", playground_views.playground_stream, name="playground_stream"),
    path("p/<slug:slug>/playground/save", playground_views.playground_save, name="playground_save"),
]
