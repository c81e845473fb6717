"""Does the teacher state the fact a query asks for more often with the
prompt's relevant passages beside the question? Side by side in one run:
the scenario's train queries that ask a fact (its facts.json), N samples
each, WITH the prompt, without and with `passages` BM25 passages
(engines.curation.Retriever), the product's sampling settings.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/passages.py harbor [--queries 24] [--passages 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario")
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--passages", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from engines import curation, facts
    from engines.inference import GenerationSettings, generate_samples, load_model
    from engines.rules import validate_rules

    folder = REPO / "scenarios" / args.scenario
    prompt = (folder / "prompt.md").read_text()
    rules = validate_rules(json.loads((folder / "rules.json").read_text()))
    checks = facts.validate_facts(json.loads((folder / "facts.json").read_text()))
    queries = [json.loads(line)["messages"] for line in (folder / "train.jsonl").read_text().splitlines()]
    asked = [(q, facts.applicable(checks, curation.last_user_text(q))) for q in queries]
    asked = [(q, a) for q, a in asked if a][: args.queries]
    loaded = load_model(REPO / "var" / "models" / "SmolLM2-135M-Instruct")
    cur = curation.CurationSettings()
    gen = GenerationSettings(
        max_new_tokens=108,
        temperature=cur.temperature,
        top_p=cur.top_p,
        batch_size=16,
        no_repeat_ngram_size=4,
    )
    literals = [r.params["text"] for r in rules if r.kind in ("starts_with", "ends_with")]
    retriever = curation.Retriever(prompt, exclude=literals)
    found = [retriever.relevant(curation.last_user_text(q), args.passages) for q, _ in asked]
    hits = sum(
        any(f.source and any(f.source[:40] in p.text for p in got) for f in a)
        for (_, a), got in zip(asked, found, strict=True)
    )
    print(
        f"{args.scenario}: {len(asked)} train queries asking a fact; the fact's sentence among the "
        f"{args.passages} passages for {hits}"
    )
    arms = {
        "the prompt": [q for q, _ in asked],
        f"the prompt + {args.passages} passages": [
            curation.with_note(q, curation.facts_note(got)) for (q, _), got in zip(asked, found, strict=True)
        ],
    }
    for name, conversations in arms.items():
        began = time.monotonic()
        groups = generate_samples(
            loaded, conversations, prompt, gen, args.samples, opening=curation.opening(rules)
        )
        stated = [
            [all(facts.states(f, c.text) for f in a) for c in group]
            for group, (_, a) in zip(groups, asked, strict=True)
        ]
        per_answer = sum(map(sum, stated)) / (args.samples * len(asked))
        per_query = sum(map(any, stated)) / len(asked)
        print(
            f"  {name:<28} answers stating the asked fact {per_answer:.2f}, queries with >= 1 of "
            f"{args.samples} {per_query:.2f}, {time.monotonic() - began:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
