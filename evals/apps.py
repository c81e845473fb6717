from django.apps import AppConfig


class EvalsConfig(AppConfig):
    name = "evals"
    verbose_name = "Evals"

    def ready(self) -> None:
        from evals import runner, signals  # noqa: F401  (registers the "eval" job kind; follows absorbs)
