"""Adaptive best-of-N: sample until a query has an answer that passes.

A rule no program can repair (a required phrase, a pattern, a fact the answer
must state) is met only by sampling: round one asks every query for
`best_of` samples; each later round asks only the queries with no passing
sample yet (after repairs), with a teacher-only reminder of what their best
sample still fails placed after the question, where a small model attends to
it. A query stops at its first passing sample or when its rounds are spent,
so the extra cost lands on the hard queries only.

Where the teacher cannot meet a required phrase or the facts unaided, round
one asking for them is a round spent for nothing: round one first asks a
probe of `probe` queries as they come; a required phrase (or the facts) that
fewer than EARLY_BELOW of the probe's samples meet opens the other queries'
answers from round one on (`Early`), as a later round would have.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engines.chat import Message
from engines.curation.context import with_note
from engines.curation.repairs import repair
from engines.progress import Progress
from engines.rules import Rule, check_all

if TYPE_CHECKING:
    from engines.generator import Generator
    from engines.inference import GenerationSettings
    from engines.progress import ProgressFn, StopFn

Checker = Callable[[str], dict[str, bool]]  # extra checks of one answer (facts), name -> passed


@dataclass
class Sample:
    text: str
    finish_reason: str
    round: int  # 0: the first round; later rounds carried a reminder
    phrase: bool = False  # opened with more than the opening: a required phrase or a fact's sentence

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "round": self.round,
            "phrase": self.phrase,
        }


@dataclass
class RoundCost:
    round: int
    queries: int
    samples: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "queries": self.queries,
            "samples": self.samples,
            "seconds": self.seconds,
        }


# What round one's probe must see met before round one leaves a required phrase (or the facts) to the teacher.
EARLY_BELOW = 0.5
FACTS = "facts"  # Early.rates' key for the facts a query asks


@dataclass(frozen=True)
class Early:
    """What round one prefills after its probe: the contains rules named in
    `phrases` and, with `facts`, the sentences stating the facts each query
    asks. `rates`: what the probe's samples met unaided (by rule name, and
    FACTS), over `probed` queries."""

    phrases: tuple[str, ...] = ()
    facts: bool = False
    rates: tuple[tuple[str, float], ...] = ()
    probed: int = 0

    def __bool__(self) -> bool:
        return bool(self.phrases or self.facts)

    def to_json(self) -> dict[str, Any]:
        return {
            "phrases": list(self.phrases),
            "facts": self.facts,
            "rates": dict(self.rates),
            "probed": self.probed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Early:
        return cls(
            tuple(data["phrases"]), bool(data["facts"]), tuple(data["rates"].items()), int(data["probed"])
        )

    def prefilled(self, phrase: str = "{!r}") -> list[str]:
        """What round one prefills, in words (`phrase` formats a rule's name)."""
        return [*(phrase.format(n) for n in self.phrases), *(["fact sentences"] if self.facts else [])]

    def describe(self) -> str:
        """One line for a job's log."""
        rates = ", ".join(f"{name} {rate:.2f}" for name, rate in self.rates)
        what = self.prefilled("required phrase {!r}")
        then = f"round one opens the other answers with {' and '.join(what)}" if what else "nothing prefilled"
        return f"probe of {self.probed} queries met unaided: {rates or 'nothing to learn'}; {then}"


@dataclass
class Sampled:
    """Every query's samples, in order, what each round cost, and what round
    one prefilled after its probe (None: no probe ran)."""

    samples: list[list[Sample]]
    rounds: list[RoundCost] = field(default_factory=list)
    early: Early | None = None


def reminder(rules: Sequence[Rule], failing: Sequence[str], facts: Sequence[str] = ()) -> str:
    """A short instruction naming what the answer must do, in the words a
    small model follows: one sentence per failing rule, then the facts (their
    prompt sentences) it did not state."""
    by_name = {r.name: r for r in rules}
    parts = [_ask(by_name[name]) for name in failing if name in by_name]
    if facts:
        parts.append("Use this information: " + " ".join(facts))
    return ("(Important: " + " ".join(parts) + ")") if parts else ""


def _ask(rule: Rule) -> str:
    p = rule.params
    text = json.dumps(p.get("text", ""), ensure_ascii=False)
    return {
        "contains": f"Your reply must include the words {text}.",
        "not_contains": f"Do not write {text}.",
        "starts_with": f"Begin your reply with {text}.",
        "ends_with": f"End your reply with {text}.",
        "max_words": f"Use at most {p.get('n')} words.",
        "lowercase": "Write in lowercase only.",
        "no_list_markup": "Write sentences, not a list.",
        "json_valid": "Reply with valid JSON only.",
    }.get(rule.kind, f"Follow the rule {json.dumps(rule.name, ensure_ascii=False)}.")


def verdict(
    text: str, rules: Sequence[Rule], repairs: Sequence[str], extra: Checker | None = None
) -> dict[str, bool]:
    """Each check of a sample as it will be kept (after repairs): rules by
    name, then the extra checks."""
    return repaired_verdict(text, rules, repairs, extra)[1]


def repaired_verdict(
    text: str, rules: Sequence[Rule], repairs: Sequence[str], extra: Checker | None = None
) -> tuple[str, dict[str, bool]]:
    """The sample as it will be kept (after repairs), and its `verdict`."""
    fixed = repair(text, rules, enabled=repairs).text if rules else text
    checks = check_all(rules, fixed)
    if extra is not None:
        checks.update(extra(fixed))
    return fixed, checks


def sample_until_pass(
    teacher: Generator,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None,
    settings: GenerationSettings,
    rules: Sequence[Rule],
    *,
    best_of: int,
    rounds: int,
    repairs: Sequence[str],
    opening: str | None = None,
    notes: Sequence[str] | None = None,
    checkers: Sequence[Checker | None] | None = None,
    sources: Sequence[dict[str, str]] | None = None,
    reminders: bool = True,
    phrases: bool = True,
    fact_sentences: bool = True,
    probe: int = 0,
    early: Early | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Sampled:
    """Sample each conversation in rounds of `best_of` until one sample
    passes every rule (after repairs) and every extra check, or `rounds` are
    spent. `notes[i]` is teacher-only text added after query i's question
    (e.g. retrieved passages); `checkers[i]` adds checks for query i (facts)
    and `sources[i]` maps such a check's name to the sentence a reminder
    quotes. With `reminders` off, later rounds repeat the first one's request.
    With `phrases`, a later-round answer whose query's best sample lacks a
    phrase a contains rule requires opens with that phrase (after the
    opening): the model writes the rest around it. With `fact_sentences`, such an
    answer whose query's best sample misses a fact opens with the sentence
    `sources` gives for it (the prompt's sentence stating it), so the data
    states what the question asks even where the teacher would not find it.
    With `probe` (> 0, and later rounds that prefill), round one asks that
    many queries first and prefills for the rest what they met too rarely
    (`Early`, returned as `Sampled.early`); `early` (an earlier chunk's) skips the probe."""
    n = len(conversations)
    notes = notes or [""] * n
    checkers = checkers or [None] * n
    out = Sampled([[] for _ in range(n)])
    judged: dict[tuple[int, int], dict[str, bool]] = {}  # (query, sample) -> checks: each sample judged once

    def checks_of(i: int) -> list[dict[str, bool]]:
        for k in range(len(out.samples[i])):
            if (i, k) not in judged:
                judged[i, k] = verdict(out.samples[i][k].text, rules, repairs, checkers[i])
        return [judged[i, k] for k in range(len(out.samples[i]))]

    asked = 0

    def ask(r: int, queries: list[int], asks: list[list[Message]], starts: list[str | None]) -> None:
        """One generate call for these queries of round r, each row with its own opening."""
        nonlocal asked
        began = time.monotonic()

        def round_progress(p: Progress, offset: int = asked) -> None:
            # Samples generated so far over every round (the engines count this call's).
            if progress is not None:
                progress(dataclasses.replace(p, done=offset + p.done, total=None))

        groups = teacher.generate_samples(
            asks,
            system_prompt,
            settings,
            best_of,
            opening=starts[0] if len(set(starts)) == 1 else starts,
            progress=round_progress if progress is not None else None,
            should_stop=should_stop,
        )
        for i, start, group in zip(queries, starts, groups, strict=True):
            out.samples[i].extend(Sample(c.text, c.finish_reason, r, start != opening) for c in group)
        asked += len(queries) * best_of
        out.rounds.append(
            RoundCost(r, len(queries), len(queries) * best_of, round(time.monotonic() - began, 2))
        )

    prefills = rounds > 1 and reminders and (phrases or fact_sentences)
    todo = list(range(n))
    if prefills and early is None and 0 < probe < n:
        probed = todo[:probe]
        ask(0, probed, [with_note(conversations[i], notes[i]) for i in probed], [opening] * len(probed))
        early = _learn([checks_of(i) for i in probed], rules, phrases, fact_sentences, sources is not None)
        out.early = early
        todo = todo[probe:]
    elif not prefills:
        early = None
    for r in range(max(1, rounds)):
        if not todo:
            break
        # Per query: what it is told and how its answer opens (later rounds may differ per query);
        # one call for the round, each row with its own opening, so batches stay wide.
        asks: list[list[Message]] = []
        starts: list[str | None] = []
        for i in todo:
            note, start = notes[i], opening
            if r > 0 and reminders:
                best = _best_checks(checks_of(i))
                note = " ".join(x for x in (note, _reminder_for(i, best, rules, sources)) if x)
            elif r == 0 and early:
                # As a later round would open it, had round one failed as the probe did.
                best = {name: False for name in early.phrases}
                if early.facts and sources is not None:
                    best.update({name: False for name in sources[i]})
            else:
                best = None
            if best is not None:
                start = _prefilled(
                    opening,
                    rules,
                    best,
                    phrases=phrases,
                    statements=_missed_facts(i, best, rules, sources) if fact_sentences else [],
                )
            asks.append(with_note(conversations[i], note))
            starts.append(start)
        ask(r, todo, asks, starts)
        todo = [i for i in range(n) if not _passed(checks_of(i))]  # the probe's failures join round two
    return out


def _passed(judged: Sequence[dict[str, bool]]) -> bool:
    return any(all(c.values()) for c in judged)


def _learn(
    judged: Sequence[Sequence[dict[str, bool]]],
    rules: Sequence[Rule],
    phrases: bool,
    fact_sentences: bool,
    has_sources: bool,
) -> Early:
    """What the probe's samples (`judged`: each query's checks) met too
    rarely to leave to round one: each contains rule, and the facts."""
    samples = [c for query in judged for c in query]
    rates: list[tuple[str, float]] = []
    early_phrases: list[str] = []
    if phrases:
        for rule in rules:
            if rule.kind == "contains" and samples:
                rate = sum(c.get(rule.name, True) for c in samples) / len(samples)
                rates.append((rule.name, round(rate, 3)))
                if rate < EARLY_BELOW:
                    early_phrases.append(rule.name)
    facts = False
    if fact_sentences and has_sources:
        names = {r.name for r in rules}
        asking = [c for c in samples if any(k not in names for k in c)]
        if asking:
            rate = sum(all(ok for k, ok in c.items() if k not in names) for c in asking) / len(asking)
            rates.append((FACTS, round(rate, 3)))
            facts = rate < EARLY_BELOW
    return Early(tuple(early_phrases), facts, tuple(rates), len(judged))


def _best_checks(judged: Sequence[dict[str, bool]]) -> dict[str, bool]:
    """The checks of the query's best sample so far (the most passed)."""
    best: dict[str, bool] = {}
    for checks in judged:
        if not best or sum(checks.values()) > sum(best.values()):
            best = checks
    return best


def _reminder_for(
    i: int, best: dict[str, bool], rules: Sequence[Rule], sources: Sequence[dict[str, str]] | None
) -> str:
    """What query i's best sample so far still fails, as a reminder."""
    rule_names = {r.name for r in rules}
    failing_rules = [name for name, ok in best.items() if not ok and name in rule_names]
    known = sources[i] if sources is not None else {}
    facts = [known[name] for name, ok in best.items() if not ok and name not in rule_names and name in known]
    return reminder(rules, failing_rules, facts)


def _missed_facts(
    i: int, best: dict[str, bool], rules: Sequence[Rule], sources: Sequence[dict[str, str]] | None
) -> list[str]:
    """The sentences stating the facts query i's best sample misses, each once."""
    rule_names = {r.name for r in rules}
    known = sources[i] if sources is not None else {}
    out: list[str] = []
    for name, ok in best.items():
        sentence = known.get(name, "").strip()
        if not ok and name not in rule_names and sentence and sentence not in out:
            out.append(sentence)
    return out


def _prefilled(
    opening: str | None,
    rules: Sequence[Rule],
    best: dict[str, bool],
    *,
    phrases: bool,
    statements: Sequence[str],
) -> str | None:
    """The opening, then the sentences stating missed facts, then each
    required phrase the best sample lacks (the model writes on from there)."""
    missing = (
        [r.params["text"].strip() for r in rules if r.kind == "contains" and not best.get(r.name, True)]
        if phrases
        else []
    )
    if not missing and not statements:
        return opening
    return " ".join([*([opening.rstrip()] if opening else []), *statements, *missing])
