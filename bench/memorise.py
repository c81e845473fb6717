"""Can the student learn the prompt's facts, and how? The teacher is taken
out of the question: every train row's answer is written from the scenario
itself (the rules' required texts around the prompt's own sentence stating
each fact the query asks, by facts.json), so the data is right by
construction and only the student's learning is measured. Side by side in
one run, each from the base with the same rows and seed:

  - memorise (E epochs): the student sees only the user's words, as today;
  - retrieve: the student also sees the prompt's K passages BM25 ranks best
    for the query (`curation.with_passages`: the product's
    `student_passages`), in training and when answering.

Each student answers (greedy, no prompt) the train queries that ask a fact
(can it recall what it saw?) and the held-out ones (does it carry over?).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/memorise.py fernhill [--rows 120] [--run epochs=12 --run view=retrieve,lr=1e-3] [--passages 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    DJANGO_SETTINGS_MODULE="workbench.settings",
    WORKBENCH_LOCAL_SECRET_KEY="true",
    TOKENIZERS_PARALLELISM="false",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario")
    parser.add_argument("--rows", type=int, default=120, help="train rows: every fact row, then others")
    parser.add_argument(
        "--run",
        action="append",
        default=None,
        metavar="SPEC",
        help="a student to train, e.g. 'epochs=12' or 'view=retrieve,lr=1e-3,repeat=3' "
        "(view: memorise|retrieve; repeat: copies of each fact row); "
        "default: epochs=4, epochs=12, view=retrieve",
    )
    parser.add_argument("--passages", type=int, default=2)
    parser.add_argument("--no-base", action="store_true", help="skip the untrained base's rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    import django
    import torch

    torch.set_num_threads(args.threads)
    django.setup()  # the teacher job's Guide lives in jobs.runners
    from engines import curation, facts
    from engines.inference import GenerationSettings, generate, load_model
    from engines.rules import validate_rules
    from engines.training import TrainConfig, train
    from jobs.runners.teacher import Guide

    folder = REPO / "scenarios" / args.scenario
    prompt = (folder / "prompt.md").read_text()
    rules = validate_rules(json.loads((folder / "rules.json").read_text()))
    checks = facts.validate_facts(json.loads((folder / "facts.json").read_text()))
    guide = Guide(prompt, rules, checks, passages=args.passages)

    def load(split: str) -> list[list[dict[str, str]]]:
        lines = (folder / f"{split}.jsonl").read_text().splitlines()
        return [json.loads(line)["messages"] for line in lines if line.strip()]

    def asked(q: list[dict[str, str]]) -> list[facts.FactCheck]:
        return facts.applicable(checks, curation.last_user_text(q))

    train_q, held_q = load("train"), load("heldout")
    fact_rows = [q for q in train_q if asked(q)]
    other = [q for q in train_q if not asked(q)]
    rows = fact_rows + other[: max(0, args.rows - len(fact_rows))]
    opening = next((r.params["text"] for r in rules if r.kind == "starts_with"), "")
    closing = next((r.params["text"] for r in rules if r.kind == "ends_with"), "")
    contains = [r.params["text"] for r in rules if r.kind == "contains"]

    def answer(q: list[dict[str, str]]) -> str:
        said = list(dict.fromkeys(guide.sources(q).values()))
        return " ".join(x for x in (opening, *said, *contains, closing) if x)

    literals = curation.rule_literals(rules)

    def with_passages(q: list[dict[str, str]]) -> list[dict[str, str]]:
        # What the product's student_passages student reads (the fine-tune, the four arms, /v1).
        return curation.with_passages(q, prompt, args.passages, literals)

    held_facts = [q for q in held_q if asked(q)]

    def note(q: list[dict[str, str]]) -> str:
        return with_passages(q)[-1]["content"][len(curation.last_user_text(q)) :]

    found = sum(all(facts.states(f, note(q)) for f in asked(q)) for q in held_facts)
    print(
        f"{args.scenario}: {len(rows)} train rows ({len(fact_rows)} ask a fact), "
        f"{len(held_facts)} held-out queries ask a fact; the {args.passages} passages state "
        f"the asked facts for {found} of them"
    )
    print("example row:", curation.last_user_text(fact_rows[0]), "->", answer(fact_rows[0]))
    model_dir = REPO / "var" / "models" / "SmolLM2-135M-Instruct"
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=16)

    def recall(loaded: object, queries: list[list[dict[str, str]]]) -> float:
        done = generate(loaded, queries, None, gen)  # type: ignore[arg-type]
        ok = [all(facts.states(f, c.text) for f in asked(q)) for q, c in zip(queries, done, strict=True)]
        print(f"  e.g. {curation.last_user_text(queries[1])[-200:]!r} -> {done[1].text!r}", flush=True)
        return sum(ok) / len(ok)

    def evaluate(name: str, adapter: Path | None, view: bool, seconds: float) -> None:
        loaded = load_model(model_dir, adapter_dir=adapter)
        began = time.monotonic()
        see = with_passages if view else (lambda q: q)
        seen = recall(loaded, [see(q) for q in fact_rows])
        held = recall(loaded, [see(q) for q in held_facts])
        print(
            f"| {name} | {seen:.2f} | {held:.2f} | {seconds:.0f} | {time.monotonic() - began:.0f} |",
            flush=True,
        )

    print("| student | train queries stating the fact | held-out stating it | train s | eval s |")
    print("|---|--:|--:|--:|--:|")
    if not args.no_base:
        evaluate("base, no training", None, False, 0)
        evaluate(f"base + {args.passages} passages, no training", None, True, 0)
    specs = args.run or ["epochs=4", "epochs=12", "view=retrieve"]
    with tempfile.TemporaryDirectory(prefix="memorise-") as tmp:
        for i, spec in enumerate(specs):
            opts = dict(part.split("=", 1) for part in spec.split(",") if part)
            view = opts.get("view", "memorise") == "retrieve"
            epochs, repeat = int(opts.get("epochs", 4)), int(opts.get("repeat", 1))
            lr = float(opts.get("lr", TrainConfig().learning_rate))
            name = f"{'retrieve ' + str(args.passages) + ' passages' if view else 'memorise'}, {epochs} epochs, lr {lr:g}"
            name += f", fact rows x{repeat}" if repeat > 1 else ""
            examples = [
                {"messages": with_passages(q) if view else q, "answer": answer(q), "system_prompt": None}
                for q in rows
                for _ in range(repeat if asked(q) else 1)
            ]
            began = time.monotonic()
            result = train(
                model_dir,
                examples,
                Path(tmp) / str(i),
                TrainConfig(epochs=epochs, learning_rate=lr, general_mix=0.0),
            )
            evaluate(name, result.adapter_dir, view, time.monotonic() - began)


if __name__ == "__main__":
    main()
