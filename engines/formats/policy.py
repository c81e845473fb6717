"""The refusal policy: fields that change what a row means and that no
format here can honour (tool calls, KTO labels, DPO rejected answers unless
the caller asks for the chosen ones, images and audio). Loading such a row
without them would teach the wrong thing, so the row is refused, naming the
field and what to do instead."""

from __future__ import annotations

from engines.formats.base import Bad

MULTIMODAL_FIELDS = ("images", "image", "audios", "audio", "videos", "video")
TOOL_FIELDS = ("tools", "functions", "function_description")
TOOL_REASON = "tool calls need a tool-capable chat template; this workbench's base models have none"
KTO_REASON = (
    "label: KTO preference data: label false marks an undesirable answer; the workbench trains on "
    "answers it should imitate — remove the rows labelled false or drop the label field"
)
DPO_REASON = (
    "chosen/rejected: DPO preference pairs; the workbench trains on one answer per query — "
    'turn on "use only the chosen answers" to load the chosen answers '
    "and drop the rejected ones"
)
# Roles of tool results and calls, in the dialects of OpenAI, ShareGPT/glaive and Llama.
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")


def refuse_meaning_fields(row: dict[str, object], use_chosen: bool) -> None:
    """Raise Bad naming the first field of `row` that changes its meaning."""
    for key in TOOL_FIELDS:
        if row.get(key):
            raise Bad(f"{key}: {TOOL_REASON}")
    chat = row.get("chat")
    if isinstance(chat, str) and ("<functioncall>" in chat or "FUNCTION RESPONSE" in chat):
        raise Bad(f"chat: glaive-style function calling: {TOOL_REASON}")
    for key in ("messages", "conversations"):
        turns = row.get(key)
        if not isinstance(turns, list):
            continue
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                continue
            for call in ("tool_calls", "function_call"):
                if turn.get(call):
                    raise Bad(f"{key}[{i}].{call}: {TOOL_REASON}")
            role = turn.get("role", turn.get("from"))
            if isinstance(role, str) and role.lower() in TOOL_ROLES:
                raise Bad(f"{key}[{i}]: a {role!r} turn: {TOOL_REASON}")
    if isinstance(row.get("label"), bool):
        raise Bad(KTO_REASON)
    for key in MULTIMODAL_FIELDS:
        if row.get(key):
            raise Bad(
                f"{key}: multimodal rows: the base models here read text only — drop the {key} field "
                "and any <image> placeholders, or the rows that need them"
            )
    if not use_chosen and ("chosen" in row or "rejected" in row):
        raise Bad(DPO_REASON)
