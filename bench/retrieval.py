"""How often the reading student (`student_passages` k) has the fact it is
asked for in front of it: on each scenario's queries that ask a fact (its
facts checks' question patterns), whether the k passages BM25 picks
(engines.curation.context, as in training, the four arms and serving) state
every fact the query asks (the checks' own `states`). No model runs.

    .venv/bin/python bench/retrieval.py [--split heldout] [--scenarios lumen,harbor,fernhill] [--dense]

With --dense, two more rankers are measured beside BM25 (the default model
runs, no training): "eol", the cosine of the base model's last hidden state
at the end of 'This sentence : "TEXT" means in one word:"' (PromptEOL), and
"rrf", BM25 and eol fused by reciprocal rank (k=60).

This caps the student's fact recall when it reads k passages: a fact it
was not shown it can only recall from training.

With --budgets 60,70 BM25 is also measured with a token budget instead of a
count: the best-ranked passages that fit in that many tokens of the
student's note (a passage that does not fit is passed over for a shorter
one; the first always goes in), with the note's mean length beside k=2's.
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


class Dense:
    """PromptEOL sentence vectors from the default model (one forward pass a text)."""

    def __init__(self, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engines.provisioning import DEFAULT_MODEL_NAME

        torch.set_num_threads(threads)
        path = REPO / ".cache" / "models" / DEFAULT_MODEL_NAME
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def embed(self, texts: list[str]):
        import torch

        out = []
        with torch.no_grad():
            for t in texts:
                ids = self.tok(f'This sentence : "{t}" means in one word:"', return_tensors="pt")
                h = self.model(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
                out.append(torch.nn.functional.normalize(h.float(), dim=0))
        return torch.stack(out)


def rankings(retriever: Retriever, queries: list[str], dense: Dense | None) -> dict[str, list[list[int]]]:
    """Passage indices best first, per ranker, per query."""
    bm25 = []
    for q in queries:
        tokens = retriever._tokens([q])
        if not tokens.ids or not tokens.ids[0]:
            bm25.append([])
            continue
        ids, scores = retriever._bm25.retrieve(tokens, k=len(retriever.passages), show_progress=False)
        bm25.append([int(i) for i, s in zip(ids[0], scores[0], strict=True) if s > 0])
    out = {"bm25": bm25}
    if dense is None:
        return out
    sims = dense.embed(queries) @ dense.embed([f"{p.heading}: {p.text}" for p in retriever.passages]).T
    eol = [sims[i].argsort(descending=True).tolist() for i in range(len(queries))]
    rrf = []
    for b, d in zip(bm25, eol, strict=True):
        score: dict[int, float] = {}
        for ranked in (b, d):
            for rank, j in enumerate(ranked):
                score[j] = score.get(j, 0.0) + 1 / (60 + rank)
        rrf.append(sorted(score, key=lambda j: -score[j]))
    return out | {"eol": eol, "rrf": rrf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="heldout", choices=("train", "heldout"))
    ap.add_argument("--scenarios", default="lumen,harbor,fernhill")
    ap.add_argument("--dense", action="store_true", help="also the base model's PromptEOL vectors, and fused")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", default="", help="token budgets of the note to measure beside k (BM25)")
    opts = ap.parse_args()
    dense = Dense(opts.threads) if opts.dense else None
    print(f"{opts.split}: share of fact queries whose k passages state every fact asked")
    print(
        f"{'scenario':<10}{'ranker':<7}{'passages':>9}{'queries':>9}"
        + "".join(f"{'k=' + str(k):>7}" for k in KS)
    )
    for name in opts.scenarios.split(","):
        retriever, queries = fact_queries(REPO / "scenarios" / name, opts.split)
        for ranker, ranked in rankings(retriever, [q for q, _ in queries], dense).items():
            shares = []
            for k in KS:
                hit = sum(
                    all(states(f, " ".join(retriever.passages[j].text for j in order[:k])) for f in asked)
                    for order, (_, asked) in zip(ranked, queries, strict=True)
                )
                shares.append(hit / len(queries))
            print(
                f"{name:<10}{ranker:<7}{len(retriever.passages):>9}{len(queries):>9}"
                + "".join(f"{s:>7.2f}" for s in shares)
            )
            budgets = [int(b) for b in opts.budgets.split(",") if b.strip()]
            if ranker == "bm25" and budgets:
                print("    " + _budgeted(retriever, ranked, queries, budgets))


def _budgeted(retriever: Retriever, ranked: list[list[int]], queries: list, budgets: list[int]) -> str:
    """The share of queries whose note, packed best-first up to each token budget, states every
    fact asked, and the note's mean tokens; k=2 first for comparison."""
    from transformers import AutoTokenizer

    from engines.curation.context import facts_note
    from engines.provisioning import DEFAULT_MODEL_NAME

    tok = AutoTokenizer.from_pretrained(REPO / ".cache" / "models" / DEFAULT_MODEL_NAME)
    n = [len(tok(p.text)["input_ids"]) for p in retriever.passages]
    out = []
    for budget in [None, *budgets]:
        hits, tokens = 0, 0
        for order, (_, asked) in zip(ranked, queries, strict=True):
            if budget is None:
                pick = order[:2]
            else:
                pick, used = [], 0
                for j in order:
                    if not pick or used + n[j] <= budget:
                        pick.append(j)
                        used += n[j]
            found = [retriever.passages[j] for j in sorted(pick)]
            tokens += len(tok(facts_note(found))["input_ids"])
            hits += all(states(f, " ".join(p.text for p in found)) for f in asked)
        label = "k=2" if budget is None else f"{budget} tokens"
        out.append(f"{label}: {hits / len(queries):.2f} ({tokens / len(queries):.0f} in the note)")
    return " | ".join(out)


if __name__ == "__main__":
    main()
