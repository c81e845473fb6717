"""How often the reading student (`student_passages` k) has the fact it is
asked for in front of it: on each scenario's queries that ask a fact (its
facts checks' question patterns), whether the k passages BM25 picks
(engines.curation.context, as in training, the four arms and serving) state
every fact the query asks (the checks' own `states`). No model runs.

    .venv/bin/python bench/retrieval.py [--split heldout] [--scenarios lumen,harbor,fernhill]

This caps the student's fact recall when it reads k passages: a fact it
was not shown it can only recall from training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engines.curation.context import Retriever, rule_literals  # noqa: E402
from engines.facts import applicable, states, validate_facts  # noqa: E402

KS = (1, 2, 3, 4, 6)


def fact_queries(folder: Path, split: str) -> tuple[Retriever, list[tuple[str, list]]]:
    prompt = (folder / "prompt.md").read_text()
    rules = json.loads((folder / "rules.json").read_text())
    facts = validate_facts(json.loads((folder / "facts.json").read_text()))
    retriever = Retriever(prompt, exclude=rule_literals(rules))
    out = []
    for line in (folder / f"{split}.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        query = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        asked = applicable(facts, query)
        if asked:
            out.append((query, asked))
    return retriever, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="heldout", choices=("train", "heldout"))
    ap.add_argument("--scenarios", default="lumen,harbor,fernhill")
    opts = ap.parse_args()
    print(f"{opts.split}: share of fact queries whose k passages state every fact asked")
    print(f"{'scenario':<10}{'passages':>9}{'queries':>9}" + "".join(f"{'k=' + str(k):>7}" for k in KS))
    for name in opts.scenarios.split(","):
        retriever, queries = fact_queries(REPO / "scenarios" / name, opts.split)
        shares = []
        for k in KS:
            hit = sum(
                all(states(f, " ".join(p.text for p in retriever.relevant(q, k))) for f in asked)
                for q, asked in queries
            )
            shares.append(hit / len(queries))
        print(
            f"{name:<10}{len(retriever.passages):>9}{len(queries):>9}" + "".join(f"{s:>7.2f}" for s in shares)
        )


if __name__ == "__main__":
    main()
