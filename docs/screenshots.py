"""Screenshots of the demo project for the README tour, taken in Debian's
chromium from a running workbench (`make demo`, then `make run`):

    .venv/bin/python docs/screenshots.py [--url http://127.0.0.1:8000] [--out docs/screenshots]

It logs in as the demo user, opens the newest "Demo: ..." project and saves
one full-page PNG per page a new user would click through."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workbench.settings")
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # Playwright's sync API runs a loop in this thread


def pages(project: Any) -> Iterator[tuple[str, str]]:
    from django.urls import reverse

    from evals.models import ArmComparison
    from jobs.models import Job

    slug = project.slug
    teacher = Job.objects.filter(project=project, kind="teacher").latest("pk")
    finetune = Job.objects.filter(project=project, kind="finetune").latest("pk")
    comparison = ArmComparison.objects.filter(project=project).latest("pk")
    answers = teacher.output_dataset
    yield "project", reverse("project_detail", args=[slug])
    yield "prompt", project.prompts.first().get_absolute_url()
    yield "jobs", reverse("job_list", args=[slug])
    yield "teacher-job", reverse("job_detail", args=[slug, teacher.pk])
    yield "finetune-job", reverse("job_detail", args=[slug, finetune.pk])
    yield "teacher-data", answers.get_absolute_url()
    yield "review", reverse("dataset_review", args=[slug, answers.dataset_id, answers.number])
    yield "four-arms", reverse("comparison_detail", args=[slug, comparison.pk])
    yield "leaderboard", reverse("suite_detail", args=[slug, comparison.suite_id])
    yield "side-by-side", reverse("side_by_side", args=[slug, comparison.suite_id])
    yield "variant", reverse("variant_detail", args=[slug, finetune.variant_id])
    yield "staging", reverse("serving_alias", args=[slug, "staging"])
    yield "serving", reverse("serving_home", args=[slug])
    yield "keys", reverse("serving_keys", args=[slug])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--username", default="demo")
    args = parser.parse_args()

    import django

    django.setup()
    from django.conf import settings
    from playwright.sync_api import sync_playwright

    from tests.conftest import CHROMIUM, CHROMIUM_ARGS
    from workbench.models import Project

    password = (settings.DATA_DIR / "demo-credentials.txt").read_text().strip()
    project = Project.objects.filter(name__startswith="Demo: ").latest("pk")
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(base_url=args.url, viewport={"width": 1280, "height": 900}).new_page()
        page.goto("/login/")
        page.get_by_label("Username").fill(args.username)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_load_state("networkidle")
        for n, (name, url) in enumerate(pages(project), start=1):
            response = page.goto(url)
            assert response is not None and response.ok, f"{url}: {response and response.status}"
            page.wait_for_load_state("networkidle")
            path = args.out / f"demo-{n:02d}-{name}.png"
            page.screenshot(path=str(path), full_page=True)
            print(path.relative_to(REPO))
        browser.close()


if __name__ == "__main__":
    main()
