"""Queries synthesised from the prompt (engines.curation.synthesize) on a
scenario: the first `--real` train queries stand for the team's real ones,
the teacher (the real SmolLM2-135M) writes up to `--count` more, and this
prints what was kept and why the rest went, how many of the scenario's facts
checks the real queries ask about against real + synthetic, the share of
synthetic queries that ask some fact, examples, and how many synthetic
queries are near-duplicates of the scenario's held-out queries (leakage).

The teacher's answers are recorded once and replayed to sweep the
near-duplicate threshold (`--sweep`): the same questions, filtered at each
threshold, so the choice of threshold is measured, not guessed.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/synthesis.py fernhill [--real 40] [--count 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class Recorded:
    """A generator that answers once through `inner` (or from a saved file)
    and then replays the same completions, each piece's first n of its
    recorded samples (a seeded sample's draw depends only on its index, so
    a prefix is what a smaller n would have drawn): the sweeps re-filter the
    same questions."""

    def __init__(self, inner: Any, saved: Path | None = None) -> None:
        self.inner = inner
        self.pools: dict[str, list[str]] = {}
        self.has_adapter = False
        if saved is not None and saved.is_file():
            self.pools = json.loads(saved.read_text())

    @staticmethod
    def _key(conversation: Any) -> str:
        return json.dumps(conversation, sort_keys=True)

    def generate_samples(
        self, conversations: Sequence[Any], system: Any, settings: Any, samples: int, **kwargs: Any
    ) -> list[Any]:
        from engines.inference import Completion

        keys = [self._key(c) for c in conversations]
        if self.inner is not None and any(len(self.pools.get(k, [])) < samples for k in keys):
            groups = self.inner.generate_samples(conversations, system, settings, samples, **kwargs)
            for k, g in zip(keys, groups, strict=True):
                self.pools[k] = [c.text for c in g]
        out = []
        for k in keys:
            pool = self.pools.get(k, [])
            assert len(pool) >= samples, "the saved answers are of other pieces or fewer samples"
            out.append([Completion(t, 0, 0, "stop", 0.0) for t in pool[:samples]])
        return out

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.pools))


# Measured in the thirteenth session (bench/README): not kept in the product.
SHOTS = [
    (
        "Opening hours",
        "The library opens at 9:00 on weekdays and at 10:00 on Saturdays.",
        "What time do you open on Saturday?",
    ),
    (
        "Membership",
        "A yearly membership costs 40 pounds; students pay half price.",
        "How much is a membership for a student?",
    ),
    (
        "Returns",
        "Books can be kept for three weeks and renewed twice online.",
        "How many times can I renew a book?",
    ),
]


def few_shot() -> None:
    """The teacher sees SHOTS as earlier turns of the conversation for each piece."""
    from engines.curation import synthesis

    plain = synthesis.conversation

    def with_examples(unit: Any) -> list[dict[str, str]]:
        out = []
        for heading, text, question in SHOTS:
            out.append({"role": "user", "content": synthesis.ASK.format(about=f" ({heading})", text=text)})
            out.append({"role": "assistant", "content": question})
        return out + plain(unit)

    synthesis.conversation = with_examples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario")
    parser.add_argument("--real", type=int, default=40, help="train queries taken as the real ones")
    parser.add_argument("--count", type=int, default=200, help="synthetic queries wanted at most")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--sweep", default="70,75,80,85,90,95", help="thresholds to replay ('' for none)")
    parser.add_argument("--top-k", default="1,2,3,5", help="round-trip k values to replay ('' for none)")
    parser.add_argument(
        "--fact-turns",
        default="1,2,3",
        help="fact_turns values to replay at the same number of drafts ('' for none); the answers are "
        "recorded for the largest",
    )
    parser.add_argument(
        "--fact-first",
        default="0,0.25,0.5,1",
        help="fact_first shares to replay at each fact_turns value ('' for none)",
    )
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument(
        "--answers", type=Path, help="save the teacher's answers here, or replay them if it exists"
    )
    parser.add_argument(
        "--few-shot",
        action="store_true",
        help="ask with three worked examples (a library's help page) before each piece, instead of zero-shot",
    )
    args = parser.parse_args()
    if args.few_shot:
        few_shot()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from engines import curation, facts
    from engines.generator import LocalGenerator
    from engines.inference import load_model
    from engines.rules import validate_rules

    folder = REPO / "scenarios" / args.scenario
    prompt = (folder / "prompt.md").read_text()
    rules = validate_rules(json.loads((folder / "rules.json").read_text()))
    checks = facts.validate_facts(json.loads((folder / "facts.json").read_text()))

    def queries(name: str) -> list[str]:
        lines = (folder / name).read_text().splitlines()
        return [curation.last_user_text(json.loads(line)["messages"]) for line in lines if line.strip()]

    real, heldout = queries("train.jsonl")[: args.real], queries("heldout.jsonl")
    literals = [r.params["text"] for r in rules if r.kind in ("starts_with", "ends_with")]
    settings = curation.SynthesisSettings(seed=args.seed)
    if args.temperature is not None:
        settings = dataclasses.replace(settings, temperature=args.temperature)
    if args.threshold is not None:
        settings = dataclasses.replace(settings, threshold=args.threshold)
    replay = args.answers is not None and args.answers.is_file()
    inner = None if replay else LocalGenerator(load_model(REPO / "var" / "models" / "SmolLM2-135M-Instruct"))
    teacher = Recorded(inner, args.answers)

    def run(s: curation.SynthesisSettings) -> curation.Synthesized:
        return curation.synthesize(
            teacher, prompt, checks, real, count=args.count, exclude=literals, settings=s
        )

    turns = [int(t) for t in args.fact_turns.split(",") if t.strip()]
    began = time.monotonic()
    if turns and max(turns) > 1 and not replay:
        # Record once for every replay: each section the samples fact_turns 1 asks, each fact's
        # piece its largest turns times as many.
        run(
            dataclasses.replace(
                settings,
                samples=_per_unit(prompt, checks, literals, args.count, settings),
                fact_turns=max(turns),
            )
        )
    made = run(settings)
    seconds = time.monotonic() - began
    if args.answers is not None and not replay:
        teacher.save(args.answers)
    report = made.report
    print(
        f"{args.scenario}: {len(real)} real queries; {report['units']} pieces ({report['sections']} section "
        f"chunks, {report['facts']} facts; facts without a passage: {report['facts_without_passage'] or 'none'}), "
        f"{report['samples_per_unit']} samples each, temperature {settings.temperature}, "
        f"threshold {settings.threshold}, top-{settings.top_k} round trip"
    )
    print(
        f"  kept {report['kept']} / asked {report['asked']} (parsed {report['parsed']}), {seconds:.0f} s"
        + (" (answers replayed from a file)" if replay else f" with {args.threads} torch thread(s)")
    )
    print("  dropped: " + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()))
    per_unit = sorted(report["per_unit"], key=lambda u: u["kept"])
    print(
        f"  per piece kept: min {per_unit[0]['kept']} ({per_unit[0]['unit']}), max {per_unit[-1]['kept']}; "
        f"pieces with none: {sum(u['kept'] == 0 for u in per_unit)}"
    )
    synthetic = [q.text for q in made.queries]

    def covered(texts: list[str]) -> set[str]:
        return {f.name for t in texts for f in facts.applicable(checks, t)}

    real_facts, all_facts = covered(real), covered(real + synthetic)
    asking = sum(bool(facts.applicable(checks, t)) for t in synthetic)
    print(
        f"  facts checks asked: real {len(real_facts)} of {len(checks)}, real + synthetic {len(all_facts)} "
        f"(new: {', '.join(sorted(all_facts - real_facts)) or 'none'})"
    )
    print(
        f"  synthetic queries asking some fact: {asking} of {len(synthetic)} ({asking / len(synthetic):.2f})"
        if synthetic
        else "  no synthetic queries"
    )
    leaks = _near(synthetic, heldout, settings.threshold)
    print(
        f"  leakage: {len(leaks)} synthetic queries at or above {settings.threshold} token-set ratio of one of the "
        f"{len(heldout)} held-out queries"
    )
    for q, h, score in leaks[:5]:
        print(f"    {score:.0f}: {q!r} ~ {h!r}")
    rng = random.Random(args.seed)
    by_kind = Counter(q.kind for q in made.queries)
    print(f"  examples ({dict(by_kind)}):")
    for q in rng.sample(made.queries, min(args.examples, len(made.queries))):
        print(f"    [{q.unit}] {q.text}")
    sweep = [float(t) for t in args.sweep.split(",") if t.strip()]
    if sweep:
        print("  threshold sweep (the same teacher answers, replayed):")
        for t in sweep:
            again = run(dataclasses.replace(settings, threshold=t))
            d = again.report["dropped"]
            texts = [q.text for q in again.queries]
            print(
                f"    {t:>5.1f}: kept {again.report['kept']:>4}, near a real query {d['near a real query']:>3}, "
                f"near a kept one {d['near a kept question']:>3}, over the total {d['over the total']:>3}, "
                f"held-out near-duplicates {len(_near(texts, heldout, t))}"
            )
        _bands(run(dataclasses.replace(settings, threshold=100.0)), real)
    if turns:
        print(
            "  fact_turns sweep (replayed, the same drafts in all): asked, kept, from facts' pieces, "
            "asking a fact, facts checks asked"
        )
        shares = [float(x) for x in args.fact_first.split(",") if x.strip()] or [settings.fact_first]
        for t in turns:
            for share in shares:
                again = run(dataclasses.replace(settings, fact_turns=t, fact_first=share))
                texts = [q.text for q in again.queries]
                asking = sum(bool(facts.applicable(checks, x)) for x in texts)
                print(
                    f"    {t} (fact_first {share:g}): asked {again.report['asked']:>4}, kept {again.report['kept']:>4}, "
                    f"from facts {sum(q.kind == 'fact' for q in again.queries):>4}, asking a fact {asking:>4} "
                    f"({asking / max(1, len(texts)):.2f}), facts asked {len(covered(real + texts))}"
                )
    top_ks = [int(k) for k in args.top_k.split(",") if k.strip()]
    if top_ks:
        print(
            "  round-trip k sweep (replayed): kept, round-trip drops, facts checks asked, share asking a fact"
        )
        for k in top_ks:
            again = run(dataclasses.replace(settings, top_k=k))
            texts = [q.text for q in again.queries]
            share = sum(bool(facts.applicable(checks, t)) for t in texts) / max(1, len(texts))
            print(
                f"    k={k}: kept {again.report['kept']:>4}, round trip {again.report['dropped']['round trip']:>3}, "
                f"facts asked {len(covered(real + texts))}, asking a fact {share:.2f}"
            )


def _per_unit(prompt: str, checks: Any, literals: list[str], count: int, settings: Any) -> int:
    """The samples a piece is asked with fact_turns 1, as engines.curation.synthesize counts them."""
    from engines.curation.synthesis import asked_pieces, units

    found, _, _ = units(prompt, checks, literals, settings.chunk_sentences)
    return asked_pieces(found, count, dataclasses.replace(settings, fact_turns=1))[2]


def _near(texts: list[str], others: list[str], threshold: float) -> list[tuple[str, str, float]]:
    from engines.curation import NearDuplicates

    found = []
    index = NearDuplicates(others, threshold)
    originals = {index._process(o): o for o in others}
    for t in texts:
        hit = index.nearest(t)
        if hit:
            found.append((t, originals.get(hit[0], hit[0]), hit[1]))
    return sorted(found, key=lambda x: -x[2])


def _bands(loose: Any, real: list[str]) -> None:
    """Pairs among the questions kept with no near-duplicate filter (and the
    real queries), by token-set ratio band: what each threshold merges."""
    from rapidfuzz import fuzz, utils

    texts = [q.text for q in loose.queries]
    pairs = []
    for i, a in enumerate(texts):
        for b in texts[i + 1 :] + real:
            pairs.append((fuzz.token_set_ratio(a, b, processor=utils.default_process), a, b))
    print("  pairs by band (what a threshold at the band's floor merges):")
    for low, high in ((95, 101), (90, 95), (85, 90), (80, 85), (75, 80)):
        band = [p for p in pairs if low <= p[0] < high]
        print(f"    [{low}, {min(high, 100)}{']' if high > 100 else ')'}: {len(band)} pairs")
        for score, a, b in random.Random(low).sample(band, min(3, len(band))):
            print(f"      {score:.0f}: {a!r} ~ {b!r}")


if __name__ == "__main__":
    main()
