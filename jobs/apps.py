from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        from jobs import signals  # noqa: F401  (connects the worker's job reaper)
        from jobs.registry import load_runner_modules

        load_runner_modules()
