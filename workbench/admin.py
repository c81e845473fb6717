from django.contrib import admin

from workbench.models import FoundationModel, Membership, Project, WorkerHeartbeat


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "created_at")
    search_fields = ("name", "slug")
    inlines = [MembershipInline]


@admin.register(FoundationModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ("name", "path", "source", "is_default")


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(admin.ModelAdmin):
    list_display = ("hostname", "queues", "last_seen", "stopped")
