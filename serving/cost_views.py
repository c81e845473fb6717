"""The cost calculator and deployment recommendation of a four-arm comparison
(a fragment the comparison page loads, and a page of its own)."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render

from evals.models import ArmComparison
from serving.costs import economics
from workbench.shortcuts import AuthedHttpRequest, get_for_project


class PriceForm(forms.Form):
    price_per_hour = forms.FloatField(
        label="Price of an hour of the serving machine",
        min_value=0,
        max_value=1_000_000,
        help_text="Any currency: a CPU host's or a GPU's hourly price.",
    )


@login_required
def comparison_costs(request: AuthedHttpRequest, slug: str, comparison_id: int) -> HttpResponse:
    comparison = get_for_project(
        request,
        slug,
        ArmComparison.objects.select_related(
            "project", "suite", "variant__base_model", "absorb_job__depends_on", "job"
        ),
        pk=comparison_id,
    )
    data = request.GET if "price_per_hour" in request.GET else None
    form = PriceForm(data, initial={"price_per_hour": settings.SERVING_PRICE_PER_HOUR})
    status = 200
    price = None
    if data is not None:
        if form.is_valid():
            price = form.cleaned_data["price_per_hour"]
        else:
            status = 400
    ctx = {
        "project": comparison.project,
        "comparison": comparison,
        "form": form,
        "money": economics(comparison, price),
    }
    template = "serving/costs.html#costs" if request.htmx else "serving/costs.html"
    return render(request, template, ctx, status=status)
