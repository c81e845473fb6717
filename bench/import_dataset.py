"""Dataset import: throughput and peak memory of `import_dataset` (stream,
validate, bulk-insert, tee to disk) on chat JSONL of 10,000 and 100,000 rows.

    .venv/bin/python bench/import_dataset.py [--sizes 10000 100000]

Each import runs in a child process of its own, on a copy of a freshly
migrated throwaway SQLite database and data directory, so one size cannot
warm or inflate the other. Two children per size:

- timed: rows/s, and peak RSS growth during the import (ru_maxrss after the
  import minus the RSS just before it; the child does nothing heavy before,
  migrations ran in another process);
- traced: tracemalloc's peak of Python allocations during the import (slow,
  so it is not timed).

Target: peak memory does not grow with the file, i.e. 100k/10k ~ 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TOPICS = ["billing", "password reset", "shipping delays", "refund policy", "API rate limits", "invoice export",
          "two-factor login", "team seats", "data retention", "webhook retries", "SSO setup", "plan downgrade"]
WORDS = ("the account settings page shows each plan with its limits and renewal date so you can check what "
         "applies to you before changing anything support confirms details by email within a day while "
         "dashboard keeps log of every change made by an administrator order number customer invoice refund "
         "window delivery address payment method card expired update team member access token request error "
         "retry later export report monthly yearly discount trial period cancel subscription").split()
SYSTEMS = ["You are the support assistant of Acme. Answer politely and cite the relevant policy.",
           "You are a concise helpdesk bot. Never promise refunds; point to the refund form instead.",
           "Answer as Acme's billing specialist. Use short paragraphs and always give the next step."]


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def write_chat_jsonl(path: Path, n: int, seed: int = 0) -> None:
    """Support-style rows: a question of 20-60 words, an answer of 40-120
    words, a system message on about a third of them."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            topic = rng.choice(TOPICS)
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
            messages.append({"role": "user", "content": f"Hi, #{i} about {topic}: {words(rng, 16, 56)}?"})
            messages.append({"role": "assistant", "content": f"Thanks for asking about {topic}. "
                                                             f"{words(rng, 35, 115).capitalize()}."})
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def django_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "WORKBENCH_DATA_DIR": str(data_dir), "DJANGO_SETTINGS_MODULE": "workbench.settings",
           "DEBUG": "false", "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)  # always the throwaway SQLite file under data_dir
    return env


def setup_django(data_dir: Path) -> None:
    os.environ.update(django_env(data_dir))
    sys.path.insert(0, str(REPO))
    import django

    django.setup()


def current_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# --- children -------------------------------------------------------------------

def child_migrate(data_dir: Path) -> None:
    setup_django(data_dir)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def child_import(data_dir: Path, file: Path, traced: bool) -> None:
    setup_django(data_dir)
    import tracemalloc

    from django.contrib.auth.models import User

    from workbench.actions import create_project
    from workbench.actions_data import import_dataset

    user = User.objects.create_user("bench")
    project = create_project(user, "Bench", "")
    gc.collect()
    rss_before = current_rss_kb()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    with file.open("rb") as f:
        version = import_dataset(project, user, "bench", f, filename=file.name)
    seconds = time.perf_counter() - t0
    result = {"rows": version.row_count, "seconds": seconds, "bytes": file.stat().st_size,
              "sha256": version.sha256, "eval": version.eval_count}
    if traced:
        result["traced_peak_kb"] = tracemalloc.get_traced_memory()[1] // 1024
        tracemalloc.stop()
    else:
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.update(rss_before_kb=rss_before, maxrss_before_kb=maxrss_before, maxrss_after_kb=maxrss_after,
                      rss_peak_delta_kb=maxrss_after - rss_before)
    print(json.dumps(result))


# --- parent -----------------------------------------------------------------------

def run_child(args: list[str], data_dir: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, __file__, *args], env=django_env(data_dir), check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--child", choices=["migrate", "import"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "migrate":
        return child_migrate(args.data_dir)
    if args.child == "import":
        return child_import(args.data_dir, args.file, args.traced)

    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        root = Path(tmp)
        template = root / "template"
        template.mkdir()
        run_child(["--child", "migrate", "--data-dir", str(template)], template)
        results: dict[int, dict[str, object]] = {}
        for n in args.sizes:
            file = root / f"chat-{n}.jsonl"
            write_chat_jsonl(file, n)
            res: dict[str, object] = {}
            for traced in (False, True):
                data_dir = root / f"data-{n}-{'traced' if traced else 'timed'}"
                shutil.copytree(template, data_dir)
                cmd = ["--child", "import", "--data-dir", str(data_dir), "--file", str(file)]
                out = run_child(cmd + (["--traced"] if traced else []), data_dir)
                if traced:
                    out.pop("seconds")  # tracemalloc slows the import: not a timing
                res.update(out)
                shutil.rmtree(data_dir)
            file.unlink()
            assert res["rows"] == n, res
            results[n] = res

    print(f"{'rows':>9} {'file MB':>8} {'seconds':>8} {'rows/s':>9} {'MB/s':>6} {'peak RSS +MB':>13} "
          f"{'tracemalloc peak MB':>20}")
    for n, r in results.items():
        secs = float(r["seconds"])  # type: ignore[arg-type]
        mb = int(r["bytes"]) / 1e6  # type: ignore[call-overload]
        print(f"{n:>9,} {mb:>8.1f} {secs:>8.2f} {n / secs:>9,.0f} {mb / secs:>6.1f} "
              f"{int(r['rss_peak_delta_kb']) / 1024:>13.1f} {int(r['traced_peak_kb']) / 1024:>20.1f}")  # type: ignore[call-overload]
    if len(results) >= 2:
        small, large = min(results), max(results)
        rss = int(results[large]["rss_peak_delta_kb"]) / int(results[small]["rss_peak_delta_kb"])  # type: ignore[call-overload]
        traced = int(results[large]["traced_peak_kb"]) / int(results[small]["traced_peak_kb"])  # type: ignore[call-overload]
        print(f"peak memory {large:,}/{small:,} rows: RSS growth x{rss:.2f}, tracemalloc peak x{traced:.2f} "
              f"(file x{large / small:.0f})")


if __name__ == "__main__":
    main()
