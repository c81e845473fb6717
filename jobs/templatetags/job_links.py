"""Job references in a job's log ("job #3", "#3") become links to the jobs
of the same project. The log is escaped first; only the anchors made here
are marked safe."""

from __future__ import annotations

import re

from django import template
from django.urls import reverse
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from jobs.models import Job
from workbench.models import Project

register = template.Library()

# After escaping, "&#x27;" and friends hold a "#": a reference starts after no word character, "&" or "#".
JOB_REF = re.compile(r"(?<![\w&#])((?:job )?#)(\d{1,12})\b", re.IGNORECASE)


@register.filter
def link_jobs(text: object, project: Project) -> SafeString:
    escaped = escape("" if text is None else str(text))
    ids = {int(m.group(2)) for m in JOB_REF.finditer(escaped)}
    if not ids:
        return escaped
    known = set(Job.objects.filter(project=project, pk__in=ids).values_list("pk", flat=True))

    def link(m: re.Match[str]) -> str:
        pk = int(m.group(2))
        if pk not in known:
            return m.group(0)
        url = escape(reverse("job_detail", args=[project.slug, pk]))
        return f'<a href="{url}">{m.group(0)}</a>'  # the matched text is "job #" or "#" and digits

    return mark_safe(JOB_REF.sub(link, escaped))  # escaped above; only the anchors made here are added
