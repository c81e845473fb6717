"""The playground: one message to one to four models, each answer streamed
into its own column, timed (time to first token, total), counted (the
engine's usage) and checked against a prompt version's rules; a turn can be
saved as a row of the project's "playground" dataset.

A model is an alias, a variant, or a base model with an optional prompt
version prepended (the teacher arm) as an unsaved Variant: each is served
through the path /v1 takes (gateway.check_params, calls.engine_request, the
engine client), so its answer is the one a client gets."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core import signing
from django.db import transaction
from django.http import HttpResponseBase, JsonResponse, StreamingHttpResponse

from engines import formats
from engines.protocol import OpenAIError
from engines.rules import RulesError, describe, outcomes, validate_rules
from serving import engine_client, limits
from serving.calls import Relay, engine_request, error_body
from serving.gateway import check_params
from serving.models import Alias
from workbench.actions import ActionError
from workbench.actions.datasets import derive_version, import_dataset
from workbench.models import (
    Dataset,
    DatasetRow,
    DatasetVersion,
    FoundationModel,
    Project,
    PromptVersion,
    Variant,
)

log = logging.getLogger(__name__)

MAX_MODELS = 4
MAX_MESSAGE_CHARS = 32_000
DEFAULT_MAX_TOKENS = 256
MAX_PROMPT_VERSIONS = 200
DATASET_NAME = "playground"
DATASET_FILENAME = "playground.jsonl"
TURN_SALT = "serving.playground.turn"
# A turn's answer may be saved for a day after it was streamed.
TURN_MAX_AGE = 24 * 3600


class NotFound(Exception):
    """A model that is not this project's (or not at all): a 404."""


@dataclass
class Pick:
    """One model of the turn: what the engine serves (a saved or unsaved variant) and its name on the page."""

    spec: str
    label: str
    variant: Variant


def _id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ValueError(f"{text[:40]!r} is not an id")
    return int(text)


def resolve(project: Project, spec: str) -> Pick:
    """alias:NAME, variant:ID or base:ID[:prompt:PROMPT_VERSION_ID] of the
    project (ValueError when the spec is malformed, NotFound when it names
    nothing of this project)."""
    kind, _, rest = spec.partition(":")
    variants = Variant.objects.select_related("base_model", "prompt_version__prompt")
    if kind == "alias":
        alias = Alias.objects.filter(project=project, name=rest[:50]).first()
        if alias is None or alias.variant_id is None:
            raise NotFound(spec)
        variant = variants.get(pk=alias.variant_id)
        return Pick(spec, f"{alias.name} · {variant.name}", variant)
    if kind == "variant":
        found = variants.filter(project=project, pk=_id(rest)).first()
        if found is None:
            raise NotFound(spec)
        return Pick(spec, found.name, found)
    if kind == "base":
        base_id, sep, prompt_id = rest.partition(":prompt:")
        base = FoundationModel.objects.filter(pk=_id(base_id)).first()
        version = None
        if sep:
            version = (
                PromptVersion.objects.select_related("prompt")
                .filter(prompt__project=project, pk=_id(prompt_id))
                .first()
            )
            if version is None:
                raise NotFound(spec)
        if base is None:
            raise NotFound(spec)
        # The teacher arm, unsaved: a prompted variant as the gateway serves one, no row to clean up.
        variant = Variant(
            project=project,
            name=base.name if version is None else f"{base.name} + {version}",
            base_model=base,
            prompt_version=version,
            prepend_prompt=version is not None,
        )
        return Pick(spec, variant.name, variant)
    raise ValueError(f"{spec[:60]!r} is not a model (alias:NAME, variant:ID or base:ID[:prompt:ID])")


def offer(project: Project) -> dict[str, Any]:
    """What the page offers, as (value, label) options: aliases that serve a
    variant, variants and base models in groups, the prompt versions a base
    may be given and whose rules may be checked (no prompt texts read), and
    the first two columns' picks."""
    aliases = list(Alias.objects.filter(project=project, variant__isnull=False).select_related("variant"))
    variants = [
        v
        for v in Variant.objects.filter(project=project).select_related("base_model").order_by("-pk")
        # A bare base variant is the base model itself (listed there), unless it has guard rails of its own.
        if not v.is_base or v.generation
    ]
    bases = list(FoundationModel.objects.order_by("-is_default", "name"))
    versions = (
        PromptVersion.objects.filter(prompt__project=project)
        .select_related("prompt")
        .only("pk", "number", "rules", "prompt__name")
        .order_by("prompt__name", "-number")[:MAX_PROMPT_VERSIONS]
    )
    groups = [
        ("Aliases", [(f"alias:{a.name}", f"{a.name} · {a.variant}") for a in aliases]),
        ("Variants", [(f"variant:{v.pk}", f"#{v.pk} {v.name}") for v in variants]),
        ("Base models", [(f"base:{b.pk}", b.name) for b in bases]),
    ]
    return {
        "model_groups": [(label, options) for label, options in groups if options],
        "prompt_versions": [(str(v.pk), str(v), len(v.rules or [])) for v in versions],
        "picks": _default_picks(aliases, variants, bases),
    }


def _default_picks(
    aliases: list[Alias], variants: list[Variant], bases: list[FoundationModel]
) -> list[tuple[str, str]]:
    """(model, prompt version) of the first columns: what the first alias
    serves and, beside it, that variant's teacher (its base with the prompt
    it absorbed) when it has one."""
    if aliases:
        first, picks = aliases[0].variant, [(f"alias:{aliases[0].name}", "")]
    elif variants:
        first, picks = variants[0], [(f"variant:{variants[0].pk}", "")]
    elif bases:
        return [(f"base:{bases[0].pk}", "")]
    else:
        return []
    if first is not None and first.prompt_version_id and not first.prepend_prompt:
        picks.append((f"base:{first.base_model_id}", str(first.prompt_version_id)))
    return picks


def rule_checks(version: PromptVersion | None, answer: str) -> list[dict[str, Any]]:
    """Each rule of `version` on the answer, as the evals check it (a pattern
    past its time limit fails with the reason)."""
    if version is None:
        return []
    try:
        rules = validate_rules(version.rules or [])
    except RulesError as exc:  # saved rules are checked when saved; today's limits may be stricter
        return [{"name": "rules", "rule": "the rules are invalid", "passed": False, "reason": exc.errors[0]}]
    results = outcomes(rules, answer)
    return [
        {
            "name": r.name,
            "rule": describe(r),
            "passed": results[r.name].passed,
            "reason": results[r.name].reason,
        }
        for r in rules
    ]


def event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


class Turn:
    """One column: the message to one model, streamed as server-sent events
    (`delta` pieces, then `done` with the counts, times, rule checks and a
    signed token to save the turn by, or `error`)."""

    def __init__(
        self,
        project: Project,
        user: User,
        pick: Pick,
        message: str,
        engine_params: dict[str, Any],
        rules_of: PromptVersion | None,
        lease: limits.Lease,
    ) -> None:
        self.project, self.user, self.pick, self.message = project, user, pick, message
        self.engine_params, self.rules_of, self.lease = engine_params, rules_of, lease
        self.request_id = f"req_{uuid.uuid4().hex}"

    def stream(self) -> HttpResponseBase:
        began = time.perf_counter()
        body = engine_request(self.pick.variant, self.engine_params, request_id=self.request_id)
        body["stream_options"] = {"include_usage": True}
        stack = ExitStack()
        stack.callback(self.lease.release)
        try:
            events = stack.enter_context(
                engine_client.client().stream(self.pick.variant, body, project=self.project.slug)
            )
        except OpenAIError as exc:
            stack.close()
            return JsonResponse(
                {"error": error_body(self.request_id, exc)["error"]["message"]}, status=exc.status
            )
        except BaseException:
            stack.close()
            raise
        response = StreamingHttpResponse(
            Relay(self._events(events, stack, began), stack.close), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response

    def _events(self, events: Iterator[str], stack: ExitStack, began: float) -> Iterator[bytes]:
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        finish, first, failed = None, None, None
        try:
            for data in events:
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    chunk = {"error": {"message": f"an event that is not JSON: {data[:200]}"}}
                if not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") == "error":
                    failed = self._failed(f"the engine stream failed: {json.dumps(chunk)[:2000]}")
                    break
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        first = first or time.perf_counter()
                        pieces.append(piece)
                        yield event("delta", {"text": piece})
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage") or usage
            else:
                failed = self._failed("the stream ended without [DONE]")
        except OpenAIError as exc:
            failed = error_body(self.request_id, exc)["error"]["message"]
        finally:
            stack.close()
        if failed is not None:
            yield event("error", {"message": failed})
            return
        total = time.perf_counter() - began
        answer = "".join(pieces)
        checks = rule_checks(self.rules_of, answer)
        yield event(
            "done",
            {
                "text": answer,
                "finish_reason": finish,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "ttft_ms": None if first is None else round((first - began) * 1000),
                "total_ms": round(total * 1000),
                "rules_of": str(self.rules_of) if self.rules_of else None,
                "rules": checks,
                "all_rules": all(c["passed"] for c in checks) if checks else None,
                "turn": self._token(answer),
            },
        )

    def _failed(self, detail: str) -> str:
        exc = OpenAIError(502, "The inference engine failed while answering.", "engine_error", detail=detail)
        message: str = error_body(self.request_id, exc)["error"]["message"]
        return message

    def _token(self, answer: str) -> str:
        """The turn, signed: a save stores exactly what was asked and answered, never text the page sends."""
        variant = self.pick.variant
        return signing.dumps(
            {
                "id": uuid.uuid4().hex,
                "project": self.project.pk,
                "user": self.user.pk,
                "message": self.message,
                "answer": answer,
                "model": self.pick.label,
                "spec": self.pick.spec,
                "variant": variant.pk,
                "settings": {
                    k: self.engine_params[k] for k in ("max_tokens", "temperature") if k in self.engine_params
                },
            },
            salt=TURN_SALT,
            compress=True,
        )


def engine_params(message: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """The engine's request as /v1 checks a chat body with these fields (OpenAIError 400 if refused)."""
    body = {
        "model": "playground",
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    return check_params(body)


def start(
    project: Project,
    user: User,
    pick: Pick,
    message: str,
    params: dict[str, Any],
    rules_of: PromptVersion | None,
) -> HttpResponseBase:
    """Stream one column under the user's share of the engine (the per-key limits of /v1)."""
    try:
        lease = limits.acquire(f"playground-user-{user.pk}", int(params["max_tokens"]))
    except limits.RateLimited as exc:
        response = JsonResponse(
            {"error": f"Too many playground answers at once: {exc.message.split(': ', 1)[-1]}"}, status=429
        )
        response["Retry-After"] = str(exc.retry_after)
        return response
    return Turn(project, user, pick, message, params, rules_of, lease).stream()


# --- saving a turn -------------------------------------------------------------------


def read_turn(project: Project, user: User, token: str) -> dict[str, Any]:
    """The turn a `done` event signed, for this project and user (ActionError otherwise)."""
    try:
        turn = signing.loads(token, salt=TURN_SALT, max_age=TURN_MAX_AGE)
    except signing.SignatureExpired:
        raise ActionError("This answer is more than a day old: send the message again to save it.") from None
    except signing.BadSignature:
        raise ActionError("This is not an answer of the playground: send the message again.") from None
    if not isinstance(turn, dict) or turn.get("project") != project.pk or turn.get("user") != user.pk:
        raise ActionError("This answer was given on another project's playground or to another user.")
    return turn


def _row(message: str, answer: str) -> list[dict[str, str]]:
    """The turn read as an uploaded chat row would be (engines.formats): the same checks and limits."""
    line = json.dumps(
        {"messages": [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]},
        ensure_ascii=False,
    )
    limits_ = formats.Limits(
        max_bytes=settings.UPLOAD_MAX_BYTES,
        max_rows=1,
        max_row_chars=settings.DATASET_MAX_ROW_CHARS,
    )
    reader = formats.DatasetReader(
        io.BytesIO(line.encode()), "chat", limits=limits_, filename=DATASET_FILENAME
    )
    rows = list(reader)
    if reader.error_count or len(rows) != 1:
        reason = reader.errors[0].reason if reader.errors else "no row"
        raise ActionError(f"This turn cannot become a dataset row: {reason}.")
    return rows[0].messages


@transaction.atomic
def save_turn(
    project: Project, user: User, turn: dict[str, Any], *, eval_split: bool
) -> tuple[DatasetVersion, int, bool]:
    """A new version of the project's "playground" dataset: its rows and
    then this turn (the user message and the answer), in the eval split when
    `eval_split` (an eval suite made from that version holds it; suites are
    copies and never change, so a turn is not added to one). Saving the same
    turn to the same split again makes nothing: (version, row index, made)."""
    split = DatasetRow.EVAL if eval_split else DatasetRow.TRAIN
    messages = _row(turn["message"], turn["answer"])
    dataset, _ = Dataset.objects.get_or_create(
        project=project, name=DATASET_NAME, defaults={"created_by": user}
    )
    # Two saves at once: the second waits and follows the first's version.
    dataset = Dataset.objects.select_for_update().get(pk=dataset.pk)
    saved = dataset.versions.filter(meta__playground__id=turn["id"], meta__playground__split=split).first()
    if saved is not None:
        return saved, saved.meta["playground"]["index"], False
    parent = dataset.latest
    if parent is None:
        line = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
        version = import_dataset(
            project,
            user,
            DATASET_NAME,
            io.BytesIO(line.encode()),
            filename=DATASET_FILENAME,
            fmt="chat",
            eval_percent=0,
        )
    else:
        kept = list(parent.rows.order_by("index").values_list("index", "messages"))
        # The turn has no row in the parent (index -1): it goes where `split` says, below.
        version = derive_version(parent, user, [*kept, (-1, messages)], kind=DatasetVersion.EDIT)
    index = version.row_count - 1
    version.rows.filter(index=index).update(split=split)
    evals = version.rows.filter(split=DatasetRow.EVAL).count()
    version.eval_percent = round(100 * evals / version.row_count)
    source = {k: turn.get(k) for k in ("id", "model", "spec", "variant", "settings")}
    version.meta = {**version.meta, "playground": {**source, "split": split, "index": index}}
    version.save(update_fields=["eval_percent", "meta"])
    return version, index, True
