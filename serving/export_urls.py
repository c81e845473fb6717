from django.urls import path

from serving import exports

urlpatterns = [
    path(
        "p/<slug:slug>/variants/<int:variant_id>/export/adapter.zip",
        exports.export_adapter,
        name="variant_export_adapter",
    ),
    path(
        "p/<slug:slug>/variants/<int:variant_id>/export/merged.zip",
        exports.export_merged,
        name="variant_export_merged",
    ),
]
