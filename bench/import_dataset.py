"""Dataset import: throughput and peak memory of `import_dataset` (stream,
validate, bulk-insert, tee to disk) on 10,000 and 100,000 rows, as chat JSONL
and as an Alpaca JSON array (indent 4, like alpaca_data.json).

    .venv/bin/python bench/import_dataset.py [--sizes 10000 100000] [--formats jsonl array]

Each import runs in a child process of its own, on a copy of a freshly
migrated throwaway SQLite database and data directory, so one size cannot
warm or inflate the other. Three children per size and format:

- timed: rows/s, and peak RSS growth during the import (ru_maxrss after the
  import minus the RSS just before it; the child does nothing heavy before,
  migrations ran in another process);
- traced: tracemalloc's peak of Python allocations during the import (slow,
  so it is not timed);
- parse: `engines.formats.DatasetReader` alone (no Django, no database), CPU
  time, best of --parse-repeats runs, then once under tracemalloc: the
  parser's own share, which the end-to-end figure hides behind the ORM.

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
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TOPICS = [
    "billing",
    "password reset",
    "shipping delays",
    "refund policy",
    "API rate limits",
    "invoice export",
    "two-factor login",
    "team seats",
    "data retention",
    "webhook retries",
    "SSO setup",
    "plan downgrade",
]
WORDS = (
    "the account settings page shows each plan with its limits and renewal date so you can check what "
    "applies to you before changing anything support confirms details by email within a day while "
    "dashboard keeps log of every change made by an administrator order number customer invoice refund "
    "window delivery address payment method card expired update team member access token request error "
    "retry later export report monthly yearly discount trial period cancel subscription"
).split()
SYSTEMS = [
    "You are the support assistant of Acme. Answer politely and cite the relevant policy.",
    "You are a concise helpdesk bot. Never promise refunds; point to the refund form instead.",
    "Answer as Acme's billing specialist. Use short paragraphs and always give the next step.",
]


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def support_rows(n: int, seed: int = 0) -> Iterator[tuple[str | None, str, str]]:
    """(system or None, question, answer): a question of 20-60 words, an
    answer of 40-120 words, a system message on about a third of them."""
    rng = random.Random(seed)
    for i in range(n):
        topic = rng.choice(TOPICS)
        system = rng.choice(SYSTEMS) if rng.random() < 0.3 else None
        question = f"Hi, #{i} about {topic}: {words(rng, 16, 56)}?"
        yield system, question, f"Thanks for asking about {topic}. {words(rng, 35, 115).capitalize()}."


def write_chat_jsonl(path: Path, n: int, seed: int = 0) -> None:
    with path.open("w", encoding="utf-8") as f:
        for system, question, answer in support_rows(n, seed):
            messages = [{"role": "system", "content": system}] if system else []
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def write_alpaca_array(path: Path, n: int, seed: int = 0) -> None:
    """The same rows as one Alpaca JSON array, laid out like alpaca_data.json
    (indent 4: six lines a record), written record by record."""
    with path.open("w", encoding="utf-8") as f:
        f.write("[")
        for i, (system, question, answer) in enumerate(support_rows(n, seed)):
            record = {
                "instruction": question,
                "input": "",
                "output": answer,
                **({"system": system} if system else {}),
            }
            text = json.dumps(record, ensure_ascii=False, indent=4).replace("\n", "\n    ")
            f.write(("," if i else "") + "\n    " + text)
        f.write("\n]\n")


WRITERS: dict[str, tuple[Callable[[Path, int], None], str]] = {
    "jsonl": (write_chat_jsonl, "chat-{n}.jsonl"),
    "array": (write_alpaca_array, "alpaca-{n}.json"),
}


def django_env(data_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "WORKBENCH_DATA_DIR": str(data_dir),
        "DJANGO_SETTINGS_MODULE": "workbench.settings",
        "DEBUG": "false",
        "PYTHONPATH": str(REPO),
        "WORKBENCH_LOCAL_SECRET_KEY": "true",
    }
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

    from workbench.actions.datasets import import_dataset
    from workbench.actions.projects import create_project

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
    result = {
        "rows": version.row_count,
        "seconds": seconds,
        "bytes": file.stat().st_size,
        "sha256": version.sha256,
        "eval": version.eval_count,
    }
    if traced:
        result["traced_peak_kb"] = tracemalloc.get_traced_memory()[1] // 1024
        tracemalloc.stop()
    else:
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.update(
            rss_before_kb=rss_before,
            maxrss_before_kb=maxrss_before,
            maxrss_after_kb=maxrss_after,
            rss_peak_delta_kb=maxrss_after - rss_before,
        )
    print(json.dumps(result))


def child_parse(file: Path, repeats: int) -> None:
    """The parser alone: best of `repeats` timed runs, then one traced run."""
    sys.path.insert(0, str(REPO))
    import tracemalloc

    from engines import formats

    def read_all() -> formats.DatasetReader:
        """Every row read and dropped, as an import's validation pass does."""
        with file.open("rb") as f:
            reader = formats.DatasetReader(f, limits=formats.Limits())
            for _ in reader:
                pass
        return reader

    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()  # CPU time: the machine may be shared, and the parser uses one core
        reader = read_all()
        best = min(best, time.process_time() - t0)
        assert reader.error_count == 0, reader.errors[:3]
    tracemalloc.start()
    read_all()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        json.dumps(
            {"parse_rows": reader.row_count, "parse_seconds": best, "parse_traced_peak_kb": peak // 1024}
        )
    )


# --- parent -----------------------------------------------------------------------


def run_child(args: list[str], data_dir: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, *args],
        env=django_env(data_dir),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--formats", nargs="+", choices=list(WRITERS), default=list(WRITERS))
    parser.add_argument("--parse-repeats", type=int, default=3)
    parser.add_argument("--child", choices=["migrate", "import", "parse"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "migrate":
        return child_migrate(args.data_dir)
    if args.child == "import":
        return child_import(args.data_dir, args.file, args.traced)
    if args.child == "parse":
        return child_parse(args.file, args.parse_repeats)

    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        root = Path(tmp)
        template = root / "template"
        template.mkdir()
        run_child(["--child", "migrate", "--data-dir", str(template)], template)
        results: dict[tuple[str, int], dict[str, object]] = {}
        for fmt in args.formats:
            write, pattern = WRITERS[fmt]
            for n in args.sizes:
                file = root / pattern.format(n=n)
                write(file, n)
                res: dict[str, object] = {}
                for traced in (False, True):
                    data_dir = root / f"data-{fmt}-{n}-{'traced' if traced else 'timed'}"
                    shutil.copytree(template, data_dir)
                    cmd = ["--child", "import", "--data-dir", str(data_dir), "--file", str(file)]
                    out = run_child(cmd + (["--traced"] if traced else []), data_dir)
                    if traced:
                        out.pop("seconds")  # tracemalloc slows the import: not a timing
                    res.update(out)
                    shutil.rmtree(data_dir)
                res.update(
                    run_child(
                        ["--child", "parse", "--file", str(file), "--parse-repeats", str(args.parse_repeats)],
                        template,
                    )
                )
                file.unlink()
                assert res["rows"] == res["parse_rows"] == n, res
                results[fmt, n] = res

    print(
        f"{'format':>6} {'rows':>9} {'file MB':>8} {'seconds':>8} {'rows/s':>9} {'MB/s':>6} {'peak RSS +MB':>13} "
        f"{'tracemalloc peak MB':>20} {'parse-only rows/s (CPU)':>24} {'parse tracemalloc MB':>21}"
    )
    for (fmt, n), r in results.items():
        secs = float(r["seconds"])  # type: ignore[arg-type]
        parse_secs = float(r["parse_seconds"])  # type: ignore[arg-type]
        mb = int(r["bytes"]) / 1e6  # type: ignore[call-overload]
        print(
            f"{fmt:>6} {n:>9,} {mb:>8.1f} {secs:>8.2f} {n / secs:>9,.0f} {mb / secs:>6.1f} "
            f"{int(r['rss_peak_delta_kb']) / 1024:>13.1f} {int(r['traced_peak_kb']) / 1024:>20.1f} "  # type: ignore[call-overload]
            f"{n / parse_secs:>24,.0f} {int(r['parse_traced_peak_kb']) / 1024:>21.1f}"
        )  # type: ignore[call-overload]
    for fmt in args.formats:
        sizes = [n for f, n in results if f == fmt]
        if len(sizes) < 2:
            continue
        small, large = results[fmt, min(sizes)], results[fmt, max(sizes)]
        rss, traced, parse = (
            int(large[k]) / int(small[k])  # type: ignore[call-overload]
            for k in ("rss_peak_delta_kb", "traced_peak_kb", "parse_traced_peak_kb")
        )
        print(
            f"{fmt}: peak memory {max(sizes):,}/{min(sizes):,} rows: RSS growth x{rss:.2f}, "
            f"tracemalloc peak x{traced:.2f}, parser alone x{parse:.2f} (file x{max(sizes) / min(sizes):.0f})"
        )


if __name__ == "__main__":
    main()
