from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from serving.models import Alias, AliasMove, ApiKey, RequestLog


class ReadOnlyAdmin(admin.ModelAdmin):
    """The audit trail and the request log are written by the app only."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Alias)
class AliasAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "variant",
        "gating_suite",
        "min_all_rules",
        "min_retained_lower",
        "max_regression",
        "log_requests",
        "updated_at",
    )
    list_filter = ("project",)
    # Moving an alias goes through the gate and the audit trail (promote/rollback), never a raw edit.
    readonly_fields = ("variant", "updated_at")


@admin.register(AliasMove)
class AliasMoveAdmin(ReadOnlyAdmin):
    list_display = ("alias", "action", "from_variant", "to_variant", "user", "created_at")
    list_filter = ("action",)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "name", "project", "created_at", "last_used_at", "revoked_at")
    list_filter = ("project",)
    readonly_fields = ("prefix", "hashed", "created_by", "created_at", "last_used_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # keys are made by create_api_key, which shows the raw key once


@admin.register(RequestLog)
class RequestLogAdmin(ReadOnlyAdmin):
    list_display = (
        "model",
        "alias",
        "status",
        "latency_ms",
        "prompt_tokens",
        "completion_tokens",
        "created_at",
    )
    list_filter = ("project", "status")
