"""Signals of the core domain, for the apps above it (workbench imports none
of them)."""

from django.dispatch import Signal

# Sent inside the transaction that removes a member (kwargs: project, user,
# actor), so what the apps above revoke is revoked with the removal or not at
# all. A receiver returns a sentence for the owner (what it revoked) or None.
member_removed = Signal()
