"""Queries synthesised from the prompt: a team with 40 real queries still
trains on hundreds.

The teacher, with a short instruction of its own (never the product's system
prompt), writes the question a customer would ask that a piece of the prompt
answers: each section (long ones cut into chunks of a few sentences) and
each facts check's source sentence. What it writes is kept only if

- it parses as one question of a sensible length that talks about the
  business, not about "the text", and does not copy the text at length;
- BM25 over the prompt's passages ranks a passage of its own piece in its top
  k (the round-trip filter of InPars and Promptagator: a question the piece
  does not answer, or that another part answers better, goes);
- it is not a near-duplicate (rapidfuzz's token-set ratio) of a real query or
  of a question already kept.

The survivors are taken round-robin over the pieces up to a total, so every
section and fact gets its share and none crowds out the others; the
questions one of the team's facts checks recognises (its question pattern
matches) go first, up to a share of the total: fact recall follows the number
of training rows that ask a fact (bench/README, issue 20).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from engines.curation.context import Passage, Retriever
from engines.facts import FactCheck, asks_a_fact
from engines.inference import GenerationSettings
from engines.progress import Progress, ProgressFn, StopFn

if TYPE_CHECKING:
    from engines.generator import Generator

# The teacher's own instruction: a question-writer, not the product's assistant.
SYSTEM = "You write the questions that customers ask in a company's support chat."
ASK = (
    'Here is part of a company\'s help page{about}:\n\n"{text}"\n\n'
    "Write one question a customer would ask that this text answers. Write only the question."
)
MAX_UNIT_CHARS = 600  # what the teacher is shown of a piece; sentences of a prompt can run long
MAX_COUNT = 5_000
# What one synthesis job of the workbench adds: at most, and unless told.
JOB_MAX_COUNT = 2_000
JOB_DEFAULT_COUNT = 200
# What an absorb adds before its teacher unless told: the count lumen, harbor and fernhill were
# measured with (bench/README: 120 beside 128 real queries raised fact recall on all three).
ABSORB_COUNT = 120
MAX_SAMPLES = 32  # per piece: a prompt of few pieces still reaches its total

# Why a question was dropped, in the order the checks run.
NOT_A_QUESTION = "not a question"
LENGTH = "length"
ABOUT_THE_TEXT = "about the text"
COPIES = "copies the text"
ROUND_TRIP = "round trip"
NEAR_REAL = "near a real query"
NEAR_KEPT = "near a kept question"
OVER_CAP = "over the total"
REASONS = (NOT_A_QUESTION, LENGTH, ABOUT_THE_TEXT, COPIES, ROUND_TRIP, NEAR_REAL, NEAR_KEPT, OVER_CAP)


@dataclass(frozen=True)
class SynthesisSettings:
    """How questions are asked for and filtered. The defaults were measured on
    the fernhill and harbor scenarios with SmolLM2-135M (bench/synthesis.py)."""

    # Samples per piece; 0: enough for the total (`oversample` x each piece's share, 2 to 32).
    samples: int = 0
    oversample: float = 3.0
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 48
    batch_size: int = 16
    seed: int | None = None
    # The round trip: a passage of the question's own piece among BM25's best k. 2 kept as many as 3
    # on fernhill and harbor, with more of them asking a fact (0.35, 0.17 against 0.34, 0.14).
    top_k: int = 2
    # Token-set ratio (0-100) at or above which two questions are near-duplicates. Measured: pairs
    # of 85-90 were mostly rewordings of one question, pairs of 80-85 mostly different questions;
    # no two real train queries asking different facts score 85 on fernhill, harbor or lumen.
    threshold: float = 85.0
    chunk_sentences: int = 4  # a longer section is cut into chunks of at most this many sentences
    # Turns a fact's piece takes for each turn of a section chunk, in the samples asked of it and in
    # the questions kept: more questions that ask a fact at the same number of drafts.
    fact_turns: int = 2
    # The most of the total that questions asking a facts check may take before the round robin
    # (0: none go first). With fact_turns 2, of 120 kept at the same ~375 drafts, lumen's questions
    # that ask a fact went from 30 to 54 and harbor's from 18 to 34 (bench/synthesis.py, issue 20).
    fact_first: float = 0.5
    min_words: int = 3
    max_words: int = 40
    copy_words: int = 8  # a question sharing this many consecutive words with its piece copies it

    def __post_init__(self) -> None:
        errors = []
        for name, low, high in (
            ("samples", 0, MAX_SAMPLES),
            ("max_new_tokens", 8, 256),
            ("batch_size", 1, 256),
            ("top_k", 1, 20),
            ("chunk_sentences", 1, 50),
            ("min_words", 1, 100),
            ("max_words", 1, 200),
            ("copy_words", 2, 100),
            ("fact_turns", 1, 8),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                errors.append(f"{name} must be a whole number from {low} to {high}, got {value!r}")
        for name, flow, fhigh in (
            ("oversample", 1.0, 10.0),
            ("threshold", 1.0, 100.0),
            ("top_p", 0.01, 1.0),
            ("fact_first", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not flow <= value <= fhigh:
                errors.append(f"{name} must be a number from {flow} to {fhigh}, got {value!r}")
        if not isinstance(self.temperature, int | float) or not 0.0 < self.temperature <= 2.0:
            errors.append(
                f"temperature must be above 0 and at most 2 (questions are sampled), got {self.temperature!r}"
            )
        if (
            isinstance(self.min_words, int)
            and isinstance(self.max_words, int)
            and self.min_words > self.max_words
        ):
            errors.append(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        if errors:
            raise ValueError("; ".join(errors))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SynthesisSettings:
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown synthesis setting(s): {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def generation(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            seed=self.seed,
            batch_size=self.batch_size,
        )


@dataclass(frozen=True)
class Unit:
    """A piece of the prompt to write questions about: a section (or a chunk
    of one) or a facts check's source sentence."""

    name: str  # "section: Fares", "section: Fares (2/3)", "fact: clinic address"
    kind: str  # "section" | "fact"
    heading: str
    text: str
    own: frozenset[Passage]  # the passages whose retrieval counts as the round trip coming home


@dataclass(frozen=True)
class SyntheticQuery:
    text: str
    unit: str  # the Unit's name
    kind: str  # "section" | "fact"


@dataclass
class Synthesized:
    queries: list[SyntheticQuery]
    report: dict[str, Any]


def _words(text: str) -> list[str]:
    return re.findall(r"[\w£$€%]+(?:['’.:,][\w]+)*", text.casefold())


def _chunks(items: list[Passage], size: int) -> list[list[Passage]]:
    """Split into as few chunks of at most `size` as it takes, of even lengths."""
    n = math.ceil(len(items) / size)
    step = len(items) / n
    return [items[round(i * step) : round((i + 1) * step)] for i in range(n)]


def units(
    prompt: str, facts: Sequence[FactCheck] = (), exclude: Sequence[str] = (), chunk_sentences: int = 4
) -> tuple[list[Unit], list[str], Retriever]:
    """The pieces of the prompt to write about, the names of the facts checks
    left out (no source, or no passage of the prompt holds it) and the
    retriever over the prompt's passages (a section holding any of
    `exclude`, a rule's own text, is left out whole: it says how to write)."""
    retriever = Retriever(prompt, exclude=exclude)
    out: list[Unit] = []
    by_heading: dict[str, list[Passage]] = {}
    for p in retriever.passages:
        by_heading.setdefault(p.heading, []).append(p)
    for heading, found in by_heading.items():
        chunks = _chunks(found, chunk_sentences)
        for i, chunk in enumerate(chunks, start=1):
            label = heading or "introduction"
            if len(chunks) > 1:
                label = f"{label} ({i}/{len(chunks)})"
            text = " ".join(p.text for p in chunk)
            out.append(Unit(f"section: {label}", "section", heading, text, frozenset(chunk)))
    skipped: list[str] = []
    for fact in facts:
        own = _holding(retriever.passages, fact.source)
        if not own:
            skipped.append(fact.name)
            continue
        heading = next(iter(own)).heading
        out.append(Unit(f"fact: {fact.name}", "fact", heading, fact.source.strip(), own))
    return out, skipped, retriever


def _holding(found: Sequence[Passage], source: str) -> frozenset[Passage]:
    """The passages that state a fact's source sentence: those holding it (or
    held by it), else the one sharing most of its words (at least half)."""
    needle = " ".join(_words(source))
    if not needle:
        return frozenset()
    texts = [" ".join(_words(p.text)) for p in found]
    direct = frozenset(p for p, t in zip(found, texts, strict=True) if t and (needle in t or t in needle))
    if direct:
        return direct
    wanted = set(needle.split())
    best, share = None, 0.5
    for p, t in zip(found, texts, strict=True):
        s = len(wanted & set(t.split())) / len(wanted)
        if s >= share:
            best, share = p, s
    return frozenset([best]) if best is not None else frozenset()


def conversation(unit: Unit) -> list[dict[str, str]]:
    about = f" ({unit.heading})" if unit.heading else ""
    text = (
        unit.text
        if len(unit.text) <= MAX_UNIT_CHARS
        else unit.text[:MAX_UNIT_CHARS].rsplit(" ", 1)[0] + " ..."
    )
    return [{"role": "user", "content": ASK.format(about=about, text=text)}]


_QUOTED = re.compile(r"[\"“]([^\"“”]{3,}?\?)\s*[\"”]")
_LEAD = re.compile(
    r"^(?:\*+|#+\s*|[-•]\s+|\d{1,3}\s*[.)]\s*|(?:q|question|customer|user|query)\s*\d*\s*[:.)-]\s*)",
    re.IGNORECASE,
)
# "A customer might ask:", "Here is a question you could ask:" before the question itself.
_INTRO = re.compile(
    r"^[^?:\"“]{0,80}\b(?:ask|asks|asked|question|query)\b[^?:\"“]{0,30}[:,]\s*", re.IGNORECASE
)
_QUOTES = "\"'“”‘’`*"
# A question about the text, or about "the customer" in the third person, is not one a customer asks.
_ABOUT_TEXT = re.compile(
    r"\b(?:this|the|above|following|that) (?:text|passage|sentence|paragraph|help page|page|excerpt)\b"
    r"|\b(?:this|that) question\b|\bthe customer\b",
    re.IGNORECASE,
)


def parse_question(raw: str) -> str | None:
    """The question in what the teacher wrote: its first line (the next when
    the first only leads in, "Here's a question:"), a quoted question taken
    out of a sentence around it, numbering, "Question:" and quotes stripped,
    cut after its last "?". None when that is no question."""
    lines = [line.strip() for line in raw.strip().splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[0]
    if line.rstrip(_QUOTES + " ").endswith(":") and "?" not in line and len(lines) > 1:
        line = lines[1]
    quoted = _QUOTED.search(line)
    if quoted:
        line = quoted.group(1)
    for _ in range(4):  # "1. Question: "What ..." peels in layers
        before = line
        line = _INTRO.sub("", _LEAD.sub("", line.strip())).strip().strip(_QUOTES).strip()
        if line == before:
            break
    if "?" not in line:
        return None
    line = line[: line.rindex("?") + 1].strip().strip(_QUOTES).strip()
    line = " ".join(line.split())
    return line if len(line) > 1 and line.endswith("?") else None


def copies(question: str, text: str, n: int) -> bool:
    """Whether the question holds `n` consecutive words of the text."""
    words, source = _words(question), _words(text)
    if len(words) < n:
        return False
    grams = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    return any(tuple(words[i : i + n]) in grams for i in range(len(words) - n + 1))


def _check(question: str | None, unit: Unit, retriever: Retriever, settings: SynthesisSettings) -> str | None:
    """Why the question cannot be kept on its own merits, or None."""
    if question is None:
        return NOT_A_QUESTION
    if not settings.min_words <= len(question.split()) <= settings.max_words:
        return LENGTH
    if _ABOUT_TEXT.search(question):
        return ABOUT_THE_TEXT
    if copies(question, unit.text, settings.copy_words):
        return COPIES
    if not unit.own & set(retriever.relevant(question, settings.top_k)):
        return ROUND_TRIP
    return None


class NearDuplicates:
    """Token-set ratio (rapidfuzz) of a question against a growing set."""

    def __init__(self, texts: Sequence[str], threshold: float) -> None:
        from rapidfuzz import utils

        self._process = utils.default_process
        self.threshold = threshold
        self.texts = [t for t in (self._process(x) for x in texts) if t]

    def nearest(self, text: str) -> tuple[str, float] | None:
        """The closest text at or above the threshold, with its score."""
        from rapidfuzz import fuzz, process

        found = process.extractOne(
            self._process(text),
            self.texts,
            scorer=fuzz.token_set_ratio,
            processor=None,
            score_cutoff=self.threshold,
        )
        return (found[0], float(found[1])) if found else None

    def add(self, text: str) -> None:
        processed = self._process(text)
        if processed:
            self.texts.append(processed)


def asked_pieces(
    found: Sequence[Unit], count: int, settings: SynthesisSettings
) -> tuple[list[Unit], list[int], int]:
    """The pieces asked about for `count` questions, each one's turns, and
    the samples a turn asks."""
    asks = math.ceil(settings.oversample * count)
    pieces = list(found)
    if len(pieces) * 2 > asks:
        # More pieces than the total needs: an even spread of them, not the first ones.
        keep = max(1, asks // 2)
        pieces = [pieces[math.floor(i * len(pieces) / keep)] for i in range(keep)]
    turns = [settings.fact_turns if u.kind == "fact" else 1 for u in pieces]
    per_unit = settings.samples or min(MAX_SAMPLES, max(2, math.ceil(asks / max(1, sum(turns)))))
    return pieces, turns, per_unit


def synthesize(
    generator: Generator,
    prompt: str,
    facts: Sequence[FactCheck] = (),
    real: Sequence[str] = (),
    *,
    count: int,
    exclude: Sequence[str] = (),
    settings: SynthesisSettings | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Synthesized:
    """Up to `count` questions about the prompt's sections and facts, none a
    near-duplicate of a `real` query or of another, spread evenly over the
    pieces. `exclude`: the rules' own texts (their section says how to write,
    nothing to ask about). One generate call for every piece, so batches
    stay wide; `should_stop` is passed on (GenerationCancelled)."""
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be a whole number from 1 to {MAX_COUNT}, got {count!r}")
    settings = settings or SynthesisSettings()
    started = time.monotonic()
    found, skipped, retriever = units(prompt, facts, exclude, settings.chunk_sentences)
    found, turns, per_unit = asked_pieces(found, count, settings)
    report: dict[str, Any] = {
        "units": len(found),
        "sections": sum(u.kind == "section" for u in found),
        "facts": sum(u.kind == "fact" for u in found),
        "facts_without_passage": skipped,
        "samples_per_unit": per_unit,
        "asked": 0,
        "parsed": 0,
        "dropped": dict.fromkeys(REASONS, 0),
        "kept": 0,
        "asking_a_fact": 0,
        "per_unit": [],
        "settings": settings.to_dict(),
        "count": count,
    }
    if not found:
        report["seconds"] = round(time.monotonic() - started, 1)
        return Synthesized([], report)
    groups = _ask(generator, found, turns, per_unit, settings, progress, should_stop)
    dropped: Counter[str] = Counter()
    candidates: list[list[str]] = []
    for unit, group in zip(found, groups, strict=True):
        mine: list[str] = []
        for completion in group:
            question = parse_question(completion.text)
            why = _check(question, unit, retriever, settings)
            if why is not None:
                dropped[why] += 1
            else:
                assert question is not None
                mine.append(question)
        candidates.append(mine)
    real_set = NearDuplicates(real, settings.threshold)
    kept_set = NearDuplicates([], settings.threshold)
    kept: list[SyntheticQuery] = []
    kept_per_unit = [0] * len(found)

    def round_robin(pools: list[list[str]], limit: int) -> list[int]:
        """Each piece in turn keeps its next question that is no near-duplicate (a piece whose
        questions repeat each other loses no turn), until `limit` are kept; how far each pool was
        read."""
        taken = [0] * len(pools)
        while len(kept) < limit and any(t < len(c) for t, c in zip(taken, pools, strict=True)):
            for i, (unit, mine) in enumerate(zip(found, pools, strict=True)):
                round_kept = 0
                while len(kept) < limit and taken[i] < len(mine) and round_kept < turns[i]:
                    question = mine[taken[i]]
                    taken[i] += 1
                    if real_set.nearest(question):
                        dropped[NEAR_REAL] += 1
                    elif kept_set.nearest(question):
                        dropped[NEAR_KEPT] += 1
                    else:
                        kept.append(SyntheticQuery(question, unit.name, unit.kind))
                        kept_set.add(question)
                        kept_per_unit[i] += 1
                        round_kept += 1
        return taken

    # First the questions a facts check recognises, up to their share; then every piece's others
    # and the first pass's leftovers, round-robin up to the total.
    asking = [[j for j, q in enumerate(mine) if asks_a_fact(facts, q)] for mine in candidates]
    first = round_robin(
        [[mine[j] for j in ask] for mine, ask in zip(candidates, asking, strict=True)],
        min(count, math.floor(settings.fact_first * count)),
    )
    rest = [
        [q for j, q in enumerate(mine) if j not in set(ask[:t])]
        for mine, ask, t in zip(candidates, asking, first, strict=True)
    ]
    taken = round_robin(rest, count)
    dropped[OVER_CAP] = sum(len(c) - t for t, c in zip(taken, rest, strict=True))
    report.update(
        asked=sum(turns) * per_unit,
        parsed=sum(turns) * per_unit - dropped[NOT_A_QUESTION],
        dropped={r: dropped[r] for r in REASONS},
        kept=len(kept),
        asking_a_fact=sum(asks_a_fact(facts, q.text) for q in kept),
        per_unit=[
            {"unit": u.name, "asked": per_unit * t, "passed": len(c), "kept": k}
            for u, t, c, k in zip(found, turns, candidates, kept_per_unit, strict=True)
        ],
        seconds=round(time.monotonic() - started, 1),
    )
    return Synthesized(kept, report)


def _ask(
    generator: Generator,
    found: Sequence[Unit],
    turns: Sequence[int],
    per_unit: int,
    settings: SynthesisSettings,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> list[list[Any]]:
    """`per_unit` x its turns samples of each piece, in one generate call a
    sample count (a seeded sample's draw depends on its index, so a piece
    asked twice would repeat itself), the groups in the pieces' order."""
    started = time.monotonic()
    out: list[list[Any]] = [[] for _ in found]
    done, total = 0, per_unit * sum(turns)  # questions asked: a call's progress counts its samples
    for t in sorted(set(turns)):
        idx = [i for i, n in enumerate(turns) if n == t]

        def moved(p: Progress, offset: int = done) -> None:
            assert progress is not None
            progress(Progress.since(started, offset + p.done, total, "questions"))

        groups = generator.generate_samples(
            [conversation(found[i]) for i in idx],
            SYSTEM,
            settings.generation(),
            per_unit * t,
            adapter=False,
            progress=moved if progress is not None else None,
            should_stop=should_stop,
        )
        for i, group in zip(idx, groups, strict=True):
            out[i] = list(group)
        done += len(idx) * per_unit * t
    return out
