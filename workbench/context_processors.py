from django.http import HttpRequest


def nav(request: HttpRequest) -> dict[str, object]:
    match = getattr(request, "resolver_match", None)
    return {"nav_active": match.url_name if match else ""}
