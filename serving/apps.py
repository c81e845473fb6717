from django.apps import AppConfig


class ServingConfig(AppConfig):
    name = "serving"
    verbose_name = "Promote & serve"

    def ready(self) -> None:
        from serving import receivers
        from serving.models import alias_moved

        alias_moved.connect(receivers.on_alias_moved, dispatch_uid="serving.load_adapters_on_alias_move")
