"""The four arms, defined once: what each one answers with, in what order a
job runs them, and how the pages label them. Every arm is one `Generator`
call on the same conversations, so one loaded model (or one server) answers
all four: the adapter is switched off for the base arms.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engines.chat import Message
from engines.progress import Progress, ProgressFn, StopFn

if TYPE_CHECKING:
    from engines.generator import Generator
    from engines.inference import Completion, GenerationSettings, LoadedModel


@dataclass(frozen=True)
class Arm:
    name: str  # stored in EvalRun.arm: never rename
    label: str
    with_prompt: bool
    with_adapter: bool
    # Teacher first: its answers are what the other arms' agreement is scored against.
    run_order: int

    def system_prompt(self, prompt: str | None) -> str | None:
        """The system prompt this arm gets, given the project's."""
        return prompt if self.with_prompt else None


FLOOR, TEACHER, STUDENT, STUDENT_PROMPT = "floor", "teacher", "student", "student+prompt"
# In display order: base without and with the prompt, then the adapter without and with it.
ARM_SPECS = (
    Arm(FLOOR, "base, no prompt", with_prompt=False, with_adapter=False, run_order=1),
    Arm(TEACHER, "base + prompt", with_prompt=True, with_adapter=False, run_order=0),
    Arm(STUDENT, "adapter, no prompt", with_prompt=False, with_adapter=True, run_order=2),
    Arm(STUDENT_PROMPT, "adapter + prompt", with_prompt=True, with_adapter=True, run_order=3),
)
ARMS = tuple(a.name for a in ARM_SPECS)
ARM_BY_NAME = {a.name: a for a in ARM_SPECS}


def arm_spec(name: str) -> Arm:
    try:
        return ARM_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown arm {name!r}: use {', '.join(ARMS)}") from None


def _as_generator(model: Generator | LoadedModel) -> Generator:
    from engines.generator import LocalGenerator
    from engines.inference import LoadedModel

    return LocalGenerator(model) if isinstance(model, LoadedModel) else model


def _check_arms(generator: Generator, arms: Sequence[str]) -> list[Arm]:
    unknown = [a for a in arms if a not in ARM_BY_NAME]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}: use {', '.join(ARMS)}")
    specs = [ARM_BY_NAME[a] for a in arms]
    if any(a.with_adapter for a in specs) and not generator.has_adapter:
        raise ValueError(
            "the student arms need the model loaded with its adapter, unmerged "
            "(load_model(..., adapter_dir=..., merge=False))"
        )
    return specs


@contextlib.contextmanager
def arm(loaded: LoadedModel, name: str, system_prompt: str | None) -> Iterator[str | None]:
    """Run as one arm inside the block, on a loaded model used directly: the
    adapter switched off for the base arms; yields the system prompt that arm
    gets (None for floor and student)."""
    [spec] = _check_arms(_as_generator(loaded), [name])
    if spec.with_adapter:
        yield spec.system_prompt(system_prompt)
    else:
        with loaded.adapter_disabled():
            yield spec.system_prompt(system_prompt)


def generate_arms(
    model: Generator | LoadedModel,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings | None = None,
    arms: Sequence[str] = ARMS,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> dict[str, list[Completion]]:
    """Every arm's answers to the same conversations, from one generator (a
    base + unmerged adapter loaded here, or a server). Each arm is its own
    `generate` call, so the shared-prefix KV cache is encoded per arm and
    never crosses arms (it depends on both the prompt and the adapter).
    `progress` gets one Progress over all arms (unit "generations");
    cancelling raises GenerationCancelled counting all arms."""
    from engines.inference import GenerationCancelled

    generator = _as_generator(model)
    specs = _check_arms(generator, arms)
    total = len(conversations) * len(specs)
    started = time.monotonic()
    out: dict[str, list[Completion]] = {}
    for index, spec in enumerate(specs):
        offset = index * len(conversations)

        def report(p: Progress, offset: int = offset) -> None:
            if progress is not None:
                progress(Progress.since(started, offset + p.done, total, "generations"))

        try:
            out[spec.name] = generator.generate(
                conversations,
                spec.system_prompt(system_prompt),
                settings,
                adapter=spec.with_adapter,
                progress=report,
                should_stop=should_stop,
            )
        except GenerationCancelled as cancelled:
            raise GenerationCancelled(offset + cancelled.done, total) from None
    return out


def single_request_latency(
    model: Generator | LoadedModel,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings | None = None,
    sample: int = 8,
    *,
    arm_name: str | None = None,
    adapter: bool = True,
) -> list[float]:
    """Wall seconds of single requests (batch 1 in process, one request in
    flight remotely, one after another) on the first `sample` conversations:
    what one user waits, where batched throughput hides it. After one untimed
    warm-up request. With `arm_name` the requests run as that arm
    (system_prompt is then the project's prompt); else `adapter` says
    whether the adapter answers."""
    from engines.inference import GenerationSettings

    generator = _as_generator(model)
    if arm_name is not None:
        [spec] = _check_arms(generator, [arm_name])
        system_prompt, adapter = spec.system_prompt(system_prompt), spec.with_adapter
    one = replace(settings or GenerationSettings(), batch_size=1)
    chosen = list(conversations[:sample])
    if not chosen:
        return []
    # The first request pays for allocator and thread-pool start-up.
    generator.generate(chosen[:1], system_prompt, replace(one, max_new_tokens=2), adapter=adapter)
    seconds = []
    for conv in chosen:
        began = time.perf_counter()
        generator.generate([conv], system_prompt, one, adapter=adapter)
        seconds.append(time.perf_counter() - began)
    return seconds
