"""The ML library the apps stand on: plain Python, no Django, no Celery.

chat (the one rendering of a conversation), inference (the one generation
engine), training (LoRA absorption), formats (dataset parsing), rules
(checkable prompt rules), leakage (prompt-leak flags), tokens (token counts),
provisioning (the default base model). Every function takes plain arguments
and, for long work, a `progress` callback, so it runs from a task, a command,
a test or a notebook alike.
"""
