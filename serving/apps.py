from django.apps import AppConfig


class ServingConfig(AppConfig):
    name = "serving"
    verbose_name = "Promote & serve"

    def ready(self) -> None:
        from jobs.models import job_finished
        from serving import receivers, runners  # noqa: F401  (runners registers the merge job kind)
        from serving.models import alias_moved
        from workbench.signals import member_removed

        alias_moved.connect(receivers.on_alias_moved, dispatch_uid="serving.load_adapters_on_alias_move")
        job_finished.connect(receivers.on_job_finished, dispatch_uid="serving.advance_spec_runs")
        member_removed.connect(
            receivers.on_member_removed, dispatch_uid="serving.revoke_keys_of_removed_member"
        )
