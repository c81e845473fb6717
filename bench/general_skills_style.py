"""Does the general-skills search scoring remove the style penalty? The base
model (no prompt) answers the shipped general-skills task through lm-eval
twice: the old task (exact match of the first line, cut at the first
newline) and the new one (search for the answer in the whole response,
exact match beside). Then the same answers, wrapped in a harbor-style
greeting and sign-off as an absorbed student writes them, are scored by
both: the search score should not move, the exact one should collapse.

    .venv/bin/python bench/general_skills_style.py [--model DIR] [--limit N] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engines.evaluation import general_skills_rows, general_skills_task, mean_ci, run_lm_eval
from engines.evaluation.harness import lm_eval_process_results, lm_eval_search_results
from engines.generator import LocalGenerator
from engines.inference import load_model

MODEL_DIR = Path("var/models/SmolLM2-135M-Instruct")
# harbor's rules: open with "Ahoy!", name Harbor Ferries, close with "Safe travels!".
STYLES = {
    "one paragraph": lambda a: f"Ahoy! Thanks for asking Harbor Ferries. {a} Safe travels!",
    "own lines": lambda a: f"Ahoy! Thanks for asking Harbor Ferries.\n{a}\nSafe travels!",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LocalGenerator(load_model(args.model))
    rows = general_skills_rows()[: args.limit]

    def fmt(values: list[float]) -> str:
        est = mean_ci(values)
        return f"{est.value:.3f} [{est.low:.3f}, {est.high:.3f}]"

    with tempfile.TemporaryDirectory() as tmp:
        task_dir = Path(tmp)
        old = general_skills_task(task_dir, "gs_exact", scoring="exact")
        new = general_skills_task(task_dir, "gs_search", scoring="search")
        timed: dict[str, float] = {}
        results = {}
        for name in (old, new):
            began = time.monotonic()
            results[name] = run_lm_eval(
                None,
                [name],
                task_dir=task_dir,
                generator=engine,
                limit=args.limit,
                batch_size=args.batch_size,
            ).tasks[name]
            timed[name] = time.monotonic() - began
    answers = results[new].responses
    print(f"{len(rows)} questions, {args.model.name}, no prompt, greedy, {args.threads} torch thread(s)")
    print(
        f"old task (first line, cut at newline) exact_match: {fmt(results[old].correct)}  ({timed[old]:.0f} s)"
    )
    print(
        f"new task search_match (primary):                 {fmt(results[new].correct)}  ({timed[new]:.0f} s)"
    )
    exact_beside = [lm_eval_search_results(r, [a])["exact_match"] for r, a in zip(rows, answers, strict=True)]
    print(f"new task exact_match (beside):                   {fmt(exact_beside)}")
    for style, wrap in STYLES.items():
        wrapped = [wrap(a.strip()) for a in answers]
        exact = [lm_eval_process_results(r, [w])["exact_match"] for r, w in zip(rows, wrapped, strict=True)]
        found = [lm_eval_search_results(r, [w])["search_match"] for r, w in zip(rows, wrapped, strict=True)]
        print(f"styled ({style}): old exact {fmt(exact)}, new search {fmt(found)}")
    misses = [
        (r["query"], r["answer"], a)
        for r, a, c in zip(rows, answers, results[new].correct, strict=True)
        if not c
    ]
    print(f"{len(misses)} missed by search, e.g.:")
    for query, answer, said in misses[:8]:
        print(f"  {query!r} expected {answer!r}, said {said.strip()[:80]!r}")


if __name__ == "__main__":
    main()
