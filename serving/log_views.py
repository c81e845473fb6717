"""The request log page of a project: logged /v1 requests, searched and
filtered (text, alias, status, latency, date), latency and tokens per day
over the matching rows, and "capture" of the selected ones into a dataset
version."""

from __future__ import annotations

import datetime
import json
import math
from collections import defaultdict
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from serving.capture import capture, parse_ids
from serving.models import Alias, RequestLog
from workbench.actions import ActionError
from workbench.models import Dataset, Project
from workbench.shortcuts import AuthedHttpRequest, get_project

PAGE_SIZE = 50
# The chart reads at most this many of the matching rows (the newest): two numbers and a date each.
CHART_ROWS = 20_000
MAX_LATENCY_MS = 24 * 3600 * 1000.0
FIRST_DAY, LAST_DAY = datetime.date(2000, 1, 1), datetime.date(2999, 12, 31)
STATUSES = [
    ("", "any status"),
    ("ok", "succeeded (200)"),
    ("failed", "failed (not 200)"),
    ("4xx", "refused (4xx)"),
    ("5xx", "server error (5xx)"),
]


class RequestLogFilter(forms.Form):
    """The log's search (GET): every field optional and bounded. The text is
    matched as plain text (icontains) in the request and the response, never
    as a pattern."""

    q = forms.CharField(required=False, max_length=200, strip=True, label="Text")
    alias = forms.ChoiceField(required=False, choices=[("", "all aliases")])
    status = forms.ChoiceField(required=False, choices=STATUSES)
    captured = forms.ChoiceField(
        required=False,
        choices=[("", "captured or not"), ("no", "not captured yet"), ("yes", "already captured")],
    )
    latency_min = forms.FloatField(
        required=False, min_value=0, max_value=MAX_LATENCY_MS, label="Latency from (ms)"
    )
    latency_max = forms.FloatField(required=False, min_value=0, max_value=MAX_LATENCY_MS, label="to (ms)")
    date_from = forms.DateField(
        required=False, label="Date from", widget=forms.DateInput(attrs={"type": "date"})
    )
    date_to = forms.DateField(required=False, label="to", widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, project: Project, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        aliases = Alias.objects.filter(project=project).order_by("name")
        field = self.fields["alias"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [
            ("", "all aliases"),
            *((a.name, a.name if a.log_requests else f"{a.name} (not logging)") for a in aliases),
        ]
        self.aliases = list(aliases)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        low, high = data.get("latency_min"), data.get("latency_max")
        for name in ("latency_min", "latency_max"):
            value = data.get(name)
            if value is not None and not math.isfinite(value):
                self.add_error(name, "Enter a number of milliseconds.")
        if low is not None and high is not None and low > high:
            self.add_error("latency_max", "The highest latency is below the lowest.")
        for name in ("date_from", "date_to"):
            day = data.get(name)
            if day is not None and not FIRST_DAY <= day <= LAST_DAY:
                self.add_error(name, f"Enter a day from {FIRST_DAY:%Y-%m-%d} to {LAST_DAY:%Y-%m-%d}.")
                data.pop(name, None)
        start, end = data.get("date_from"), data.get("date_to")
        if start and end and start > end:
            self.add_error("date_to", "The last day is before the first.")
        return data

    def filter(self, logs: QuerySet[RequestLog]) -> QuerySet[RequestLog]:
        d = self.cleaned_data
        text = d.get("q") or ""
        if text:
            # JSON may keep non-ASCII and quotes escaped (SQLite) or as they are (PostgreSQL): match both.
            escaped = json.dumps(text)[1:-1]
            match = Q(request__icontains=text) | Q(response__icontains=text)
            if escaped != text:
                match |= Q(request__icontains=escaped) | Q(response__icontains=escaped)
            logs = logs.filter(match)
        if d.get("alias"):
            logs = logs.filter(alias__name=d["alias"])
        status = d.get("status")
        if status == "ok":
            logs = logs.filter(status=200)
        elif status == "failed":
            logs = logs.exclude(status=200)
        elif status == "4xx":
            logs = logs.filter(status__gte=400, status__lt=500)
        elif status == "5xx":
            logs = logs.filter(status__gte=500, status__lt=600)
        if d.get("captured") == "no":
            logs = logs.filter(captured_into__isnull=True)
        elif d.get("captured") == "yes":
            logs = logs.filter(captured_into__isnull=False)
        if d.get("latency_min") is not None:
            logs = logs.filter(latency_ms__gte=d["latency_min"])
        if d.get("latency_max") is not None:
            logs = logs.filter(latency_ms__lte=d["latency_max"])
        if d.get("date_from"):
            logs = logs.filter(created_at__gte=_midnight(d["date_from"]))
        if d.get("date_to"):
            logs = logs.filter(created_at__lt=_midnight(d["date_to"] + datetime.timedelta(days=1)))
        return logs


def _midnight(day: datetime.date) -> datetime.datetime:
    return timezone.make_aware(datetime.datetime.combine(day, datetime.time.min))


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, linear between ranks."""
    if len(values) == 1:
        return values[0]
    rank = (len(values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def per_day(logs: QuerySet[RequestLog]) -> dict[str, Any]:
    """Latency p50/p95 and tokens per day over the newest CHART_ROWS rows of
    `logs` (dates in the current time zone)."""
    rows = list(
        logs.order_by("-created_at", "-id").values_list(
            "created_at", "latency_ms", "prompt_tokens", "completion_tokens"
        )[: CHART_ROWS + 1]
    )
    truncated = len(rows) > CHART_ROWS
    rows = rows[:CHART_ROWS]
    days: dict[datetime.date, dict[str, Any]] = defaultdict(
        lambda: {"latency": [], "prompt": 0, "completion": 0}
    )
    for created, latency, prompt, completion in rows:
        day = days[timezone.localdate(created)]
        day["latency"].append(latency)
        day["prompt"] += prompt
        day["completion"] += completion
    labels, p50, p95, prompt_tokens, completion_tokens, counts = [], [], [], [], [], []
    for day_date in sorted(days):
        day = days[day_date]
        latencies = sorted(day["latency"])
        labels.append(day_date.isoformat())
        p50.append(round(_percentile(latencies, 50), 1))
        p95.append(round(_percentile(latencies, 95), 1))
        prompt_tokens.append(day["prompt"])
        completion_tokens.append(day["completion"])
        counts.append(len(latencies))
    return {
        "labels": labels,
        "p50": p50,
        "p95": p95,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "requests": counts,
        "rows": len(rows),
        "truncated": truncated,
    }


@login_required
def request_log(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    """The log, searched and filtered by a GET form; a bad filter is a 400
    that shows the form with what was wrong, and no rows."""
    project = get_project(request, slug)
    form = RequestLogFilter(project, request.GET)
    logs = RequestLog.objects.filter(project=project).select_related(
        "alias", "variant", "captured_into__dataset"
    )
    valid = form.is_valid()
    logs = form.filter(logs) if valid else logs.none()
    page = Paginator(logs, PAGE_SIZE).get_page(request.GET.get("page"))
    # The filters as a query string without the page: the pager's links keep them.
    kept = request.GET.copy()
    kept.pop("page", None)
    ctx = {
        "project": project,
        "form": form,
        "page": page,
        "filters": kept.urlencode() if valid else "",
        "filtered": valid and any(v not in (None, "") for v in form.cleaned_data.values()),
        "alias_name": form.cleaned_data.get("alias", "") if valid else "",
        "aliases": form.aliases,
        "logging_aliases": [a for a in form.aliases if a.log_requests],
        "datasets": Dataset.objects.filter(project=project),
        "chart": per_day(logs) if valid else None,
        "nav_active": "serving_requests",
    }
    return render(request, "serving/request_log.html", ctx, status=200 if valid else 400)


@login_required
@require_POST
def request_capture(request: AuthedHttpRequest, slug: str) -> HttpResponse:
    project = get_project(request, slug)
    dataset_id = request.POST.get("dataset", "").strip()
    try:
        ids = parse_ids(request.POST.getlist("log"), "Selected request")
        [dataset_pk] = parse_ids([dataset_id], "Dataset") if dataset_id else [None]
    except ActionError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain; charset=utf-8")
    dataset = Dataset.objects.filter(project=project, pk=dataset_pk).first() if dataset_pk else None
    back = reverse("request_log", args=[project.slug])
    if dataset_pk and dataset is None:
        messages.error(request, "That dataset does not exist in this project.")
        return redirect(back)
    try:
        version = capture(
            project,
            request.user,
            ids,
            dataset=dataset,
            name=request.POST.get("name", ""),
            append=request.POST.get("append") == "on",
        )
    except ActionError as exc:
        messages.error(request, str(exc))
        return redirect(back)
    messages.success(request, f"Captured {len(ids)} request(s) into {version} ({version.row_count} rows).")
    return redirect(version.get_absolute_url())
