"""Verbs that change rows, one module per noun (projects, prompts, datasets,
models). Each verb is atomic and sends its side effects (Celery tasks) only
once the transaction commits. A user-caused problem raises ActionError."""

from __future__ import annotations


class ActionError(Exception):
    """A user-caused error; the message is shown as is."""
