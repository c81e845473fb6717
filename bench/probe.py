"""What round one's probe saves: curated teacher data for the same queries
of a scenario with the probe (the default) and without it (probe 0: a
required phrase or a fact the teacher rarely meets costs round one, then a
prefilled round two), in one process, on the default model. Prints each
way's teacher seconds, samples, the data's all-rules and facts-stated
shares, and the ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/probe.py fernhill [--queries 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

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
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import django
    import torch

    torch.set_num_threads(args.threads)
    django.setup()  # the teacher job's Guide lives in jobs.runners
    from engines import curation
    from engines.facts import validate_facts
    from engines.generator import LocalGenerator
    from engines.inference import GenerationSettings, load_model
    from engines.provisioning import DEFAULT_MODEL_NAME, provision_default
    from engines.rules import validate_rules
    from jobs.runners.teacher import Guide

    folder = REPO / "scenarios" / args.scenario
    prompt = (folder / "prompt.md").read_text()
    rules = validate_rules(json.loads((folder / "rules.json").read_text()))
    facts = validate_facts(json.loads((folder / "facts.json").read_text()))
    queries = [json.loads(line)["messages"] for line in (folder / "train.jsonl").read_text().splitlines()]
    queries = queries[: args.queries]
    cur = curation.CurationSettings()
    guide = Guide(prompt, rules, facts, cur.passages)
    words = [r.params["n"] for r in rules if r.kind == "max_words"]
    gen = GenerationSettings(
        max_new_tokens=math.ceil(min(words) * 1.6) + 16 if words else 256,
        temperature=cur.temperature,
        top_p=cur.top_p,
        seed=0,
    )
    teacher = LocalGenerator(load_model(provision_default(REPO / ".cache" / "models" / DEFAULT_MODEL_NAME)))
    opening = curation.opening(rules) if cur.prefill else None
    asking = sum(bool(guide.sources(q)) for q in queries)
    print(
        f"{args.scenario}: {len(queries)} train queries ({asking} ask a fact), best of {cur.best_of}, "
        f"up to {cur.rounds} rounds, {torch.get_num_threads()} torch thread(s), load {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    def run(probe: int) -> dict[str, Any]:
        began = time.perf_counter()
        out = curation.sample_until_pass(
            teacher,
            queries,
            prompt,
            gen,
            rules,
            best_of=cur.best_of,
            rounds=cur.rounds,
            repairs=cur.repairs,
            opening=opening,
            notes=[guide.note(q) for q in queries],
            checkers=[guide.checker(q) for q in queries],
            sources=[guide.sources(q) for q in queries],
            probe=probe,
        )
        seconds = time.perf_counter() - began
        made = [
            curation.curate(
                [s.text for s in group],
                rules,
                cur,
                opening,
                rounds=[s.round for s in group],
                extra=guide.checker(q),
                invented=guide.invented(q),
            )
            for q, group in zip(queries, out.samples, strict=True)
        ]
        with_facts = [m for m in made if m.extra]
        row = {
            "seconds": seconds,
            "samples": sum(map(len, out.samples)),
            "all_rules": sum(not m.failing for m in made) / len(made),
            "facts": sum(all(m.extra.values()) for m in with_facts) / max(1, len(with_facts)),
            "invented": sum(bool(m.record.get("invented_figures")) for m in made) / len(made),
            "rounds": [(r.round, r.queries, round(r.seconds)) for r in out.rounds],
            "early": out.early.describe() if out.early else "no probe",
        }
        print(f"  probe {probe}: {json.dumps(row)} | load {os.getloadavg()[0]:.2f}", flush=True)
        return row

    with_probe, without = run(cur.probe), run(0)
    print(f"\n{'':<28}{'probe ' + str(cur.probe):>12}{'probe 0':>12}{'ratio':>8}")
    for key, fmt in (
        ("seconds", ".0f"),
        ("samples", "d"),
        ("all_rules", ".2f"),
        ("facts", ".2f"),
        ("invented", ".2f"),
    ):
        a, b = with_probe[key], without[key]
        ratio = f"{a / b:.2f}x" if b else "-"
        print(f"  {key:<26}{a:>12{fmt}}{b:>12{fmt}}{ratio:>8}")


if __name__ == "__main__":
    main()
