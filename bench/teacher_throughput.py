"""Teacher generation throughput: plain batched generation vs shared-prefix
KV reuse (`engines.inference.generate(reuse_prefix=...)`) on the real
SmolLM2-135M-Instruct, a ~1,000-token support-bot system prompt and N
different user queries, greedy. Asserts that both give the same tokens.

    .venv/bin/python bench/teacher_throughput.py [--queries 48] [--max-new-tokens 64]
        [--batch-size 8 16] [--bf16] [--threads N]

--bf16 runs both arms under CPU bf16 autocast (compare bf16 with bf16 only:
bf16 rounding differs between the two arms' attention shapes, so greedy
outputs may differ in a few rows; the script reports how many match).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engines.inference import GenerationSettings, count_tokens, generate, load_model
from engines.provisioning import provision_default

MODEL_DIR = Path(".cache/models/SmolLM2-135M-Instruct")

PLANS = [
    ("Solo", "$4.99", "200 GB", 1, "30 days", "email"),
    ("Family", "$9.99", "2 TB", 6, "90 days", "email and chat"),
    ("Team", "$24.99", "10 TB", 25, "1 year", "email, chat and phone"),
    ("Enterprise", "custom", "unlimited", "unlimited", "7 years", "a named account manager"),
]
ERRORS = [
    ("E101", "the device lost its connection during upload", "check the network and press Resume"),
    ("E102", "the account storage quota is full", "delete old versions or upgrade the plan"),
    ("E103", "a file is locked by another program", "close the program and retry the backup"),
    ("E104", "the encryption key on this device does not match the account", "re-enter the recovery phrase"),
    ("E105", "the backup folder was moved or renamed", "pick the folder again in Settings > Sources"),
    ("E106", "the system clock is more than five minutes off", "enable automatic time synchronisation"),
    ("E107", "the app version is no longer supported", "install the latest version from the website"),
    ("E108", "too many devices on the plan", "remove an old device in the web dashboard"),
]
RULES = [
    "Start every answer with 'Hi there!' and end it with 'Is there anything else I can help with?'",
    "Answer only questions about Lumen Cloud Backup; politely decline anything else.",
    "Never promise a refund outside the refund policy below, and never invent discounts.",
    "Always name the plan your answer applies to when prices, limits or retention are involved.",
    "Never ask for a password or a full recovery phrase; staff will never need them.",
    "When an error code is mentioned, explain its meaning and the fix from the error table.",
    "If the customer is angry, apologise once, then focus on the solution.",
    "Keep answers under 120 words unless the customer asks for step-by-step instructions.",
    "Use numbered steps for instructions, one action per step.",
    "Escalate to a human (say: 'I am handing this to our support team') for legal, billing disputes or data loss.",
    "Do not speculate about outages; point to status.lumenbackup.example instead.",
    "Write in plain English without jargon; explain any technical term you must use.",
]
FACTS = [
    "Files are encrypted on the device with AES-256 before upload and stay encrypted at rest and in transit (TLS 1.3).",
    "Only the customer holds the recovery phrase; Lumen cannot decrypt files or reset the phrase.",
    "Data centres: Frankfurt (EU customers), Virginia (US customers) and Sydney (APAC customers); "
    "the region is chosen at sign-up and can be changed once a year.",
    "Deleted files stay in the Trash for the plan's retention period and can be restored from the web dashboard "
    "or the desktop app (right-click > Restore previous versions).",
    "Refunds: full refund within 14 days of the first payment; annual plans are refunded pro rata within 60 days; "
    "monthly plans are not refunded after 14 days.",
    "Billing happens on the same day each month or year; invoices are in the web dashboard under Billing.",
    "Supported systems: Windows 10 and 11, macOS 12 or later, Ubuntu 22.04 or later, iOS 16+, Android 12+.",
    "Bandwidth can be limited in Settings > Network; by default uploads pause on metered connections.",
    "Support hours: Monday to Friday 08:00-20:00 CET by chat, email answered within one business day.",
    "Two-factor authentication is available with an authenticator app or a hardware key, and is required on Team.",
]


def system_prompt() -> str:
    lines = [
        "You are Lumi, the customer support assistant of Lumen Cloud Backup, a service that backs up "
        "computers and phones to encrypted cloud storage.",
        "",
        "## Rules",
        *(f"{i}. {rule}" for i, rule in enumerate(RULES, 1)),
        "",
        "## Plans (price per month, storage, devices, version retention, support channels)",
        *(
            f"- {n}: {p}, {s} of storage, {d} devices, versions kept for {r}, support by {c}."
            for n, p, s, d, r, c in PLANS
        ),
        "Annual billing gives two months free on every plan except Enterprise.",
        "",
        "## Facts",
        *(f"- {fact}" for fact in FACTS),
        "",
        "## Error codes",
        *(f"- {code}: {meaning}. Fix: {fix}." for code, meaning, fix in ERRORS),
        "",
        "## Tone",
        "Friendly, calm and precise. Prefer short sentences. Never blame the customer.",
    ]
    return "\n".join(lines)


QUESTIONS = [
    "How do I restore a file I deleted yesterday?",
    "What does error {code} mean?",
    "How much does the {plan} plan cost per year?",
    "Can I get a refund? I paid for the {plan} plan 20 days ago.",
    "How many devices can I back up on the {plan} plan?",
    "Is my data encrypted?",
    "I lost my recovery phrase, can you reset it for me?",
    "Where is my data stored? I live in Germany.",
    "My backup keeps failing with {code} and I am getting really frustrated, this is the third time this week.",
    "Which plan should I pick for a family with four laptops and two phones?",
    "How long do you keep old versions of my files on {plan}?",
    "Do you support Linux?",
    "Can I limit how much bandwidth the backup uses while I am on video calls?",
    "hi",
    "What are your support hours?",
    "Is two-factor authentication available, and how do I turn it on?",
]


def queries(n: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        q = QUESTIONS[i % len(QUESTIONS)]
        q = q.format(code=ERRORS[i % len(ERRORS)][0], plan=PLANS[i % len(PLANS)][0])
        if i >= len(QUESTIONS):  # later rounds: vary the wording so every query differs
            q = f"{q} (Ticket #{1000 + i})" if i % 2 else f"Quick question from customer {i}: {q}"
        out.append(q)
        i += 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--bf16", action="store_true", help="run both arms under bf16 autocast")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = provision_default(MODEL_DIR, log=print)
    t = time.perf_counter()
    loaded = load_model(model_dir)
    print(f"loaded {model_dir} in {time.perf_counter() - t:.1f}s; torch threads {torch.get_num_threads()}")
    prompt = system_prompt()
    convs = [[{"role": "user", "content": q}] for q in queries(args.queries)]
    prompt_tokens = [count_tokens(loaded.tokenizer, c, prompt) for c in convs]
    print(
        f"system prompt {count_tokens(loaded.tokenizer, [], prompt)} tokens rendered alone; "
        f"{len(convs)} queries, prompts {min(prompt_tokens)}-{max(prompt_tokens)} tokens; "
        f"max_new_tokens {args.max_new_tokens}; {'bf16 autocast' if args.bf16 else 'fp32'}"
    )

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    with autocast():
        # The first batch is ~2x slower (allocator, thread pools): keep it out of the timings.
        warm = GenerationSettings(max_new_tokens=8, batch_size=4)
        for reuse in (False, True):
            generate(loaded, convs[:4], prompt, warm, reuse_prefix=reuse)

    ok = True
    for batch_size in args.batch_size:
        timings = {}
        outputs = {}
        for reuse in (False, True):
            with autocast():
                t = time.perf_counter()
                outputs[reuse] = generate(
                    loaded, convs, prompt, replace(settings, batch_size=batch_size), reuse_prefix=reuse
                )
                timings[reuse] = time.perf_counter() - t
        same = sum(
            a.text == b.text and a.completion_tokens == b.completion_tokens
            for a, b in zip(outputs[False], outputs[True], strict=True)
        )
        new_tokens = sum(c.completion_tokens for c in outputs[False])
        plain_qps, reuse_qps = len(convs) / timings[False], len(convs) / timings[True]
        print(
            f"batch {batch_size:>2}: plain {timings[False]:6.1f}s {plain_qps:.3f} q/s | "
            f"prefix reuse {timings[True]:6.1f}s {reuse_qps:.3f} q/s | ratio {reuse_qps / plain_qps:.2f}x | "
            f"{new_tokens} new tokens | identical outputs {same}/{len(convs)}",
            flush=True,
        )
        if same != len(convs):
            ok = False
            for a, b in zip(outputs[False], outputs[True], strict=True):
                if a.text != b.text:
                    print(f"  differs:\n    plain: {a.text!r}\n    reuse: {b.text!r}")
                    break
    print("sample answer:", repr(outputs[True][0].text))
    if not ok and not args.bf16:
        print("FAIL: prefix reuse changed greedy fp32 outputs")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
