"""The examples a run learns from: validation, the general instructions
mixed in against forgetting, tokenization into labelled features with the KL
masks, and the loss terms that read those masks (they must agree on which
positions are answer tokens, so they live together)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines import facts
from engines.chat import prompt_completion
from engines.training.config import ExampleError

if TYPE_CHECKING:
    import torch

Example = Mapping[str, Any]
# The label of a position that is not trained (a prompt token), as HF's losses expect.
IGNORE_INDEX = -100
GENERAL_INSTRUCTIONS = Path(__file__).resolve().parent.parent / "data" / "general_instructions.jsonl"


def validate_examples(examples: Sequence[Example], need_system_prompt: bool = False) -> None:
    if not examples:
        raise ExampleError("No training examples.")
    for i, ex in enumerate(examples):
        where = f"example {i}"
        if not isinstance(ex, Mapping):
            raise ExampleError(f"{where}: must be an object, got {type(ex).__name__}")
        msgs = ex.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ExampleError(f"{where}: 'messages' must be a non-empty list of turns")
        for j, m in enumerate(msgs):
            if not (
                isinstance(m, Mapping)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise ExampleError(f"{where}: messages[{j}] must have string 'role' and 'content'")
        if not isinstance(ex.get("answer"), str) or not ex["answer"].strip():
            raise ExampleError(f"{where}: 'answer' must be a non-empty string")
        sp = ex.get("system_prompt")
        if sp is not None and not isinstance(sp, str):
            raise ExampleError(f"{where}: 'system_prompt' must be a string or null")
        # A general row has no prompt: its teacher is the model without one.
        if need_system_prompt and not sp and not ex.get("general"):
            raise ExampleError(
                f"{where}: 'system_prompt' is required when kl_weight > 0 (the teacher's prompt)"
            )


def general_instructions() -> list[str]:
    """The shipped everyday instructions (facts, arithmetic, definitions,
    short writing), none of them a general-skills eval question."""
    with GENERAL_INSTRUCTIONS.open(encoding="utf-8") as f:
        return [json.loads(line)["query"] for line in f if line.strip()]


def general_mix_queries(task_rows: int, share: float, seed: int) -> list[str]:
    """The general instructions to mix into `task_rows` training rows:
    ceil(share x task_rows) of them, at most all there are, chosen by `seed`
    so that a retried run picks the same ones."""
    if share <= 0 or task_rows <= 0:
        return []
    pool = general_instructions()
    count = min(len(pool), math.ceil(share * task_rows))
    return random.Random(seed).sample(pool, count)


def general_examples(answers: Sequence[tuple[str, str, str]]) -> tuple[list[dict[str, Any]], int]:
    """Training examples from (instruction, the base's answer, finish reason):
    asked without a system prompt, as the base answered them, marked
    `general`. An empty answer or one cut at the token limit teaches nothing
    worth keeping (a student that stops mid-sentence): left out and counted.
    Returns (examples, left out)."""
    examples: list[dict[str, Any]] = []
    for query, text, finish_reason in answers:
        if text.strip() and finish_reason != "length":
            examples.append(
                {
                    "messages": [{"role": "user", "content": query}],
                    "answer": text.strip(),
                    "system_prompt": None,
                    "general": True,
                }
            )
    return examples, len(answers) - len(examples)


def stated_facts(example: Example, checks: Sequence[facts.FactCheck]) -> list[str]:
    """The names of the facts `example`'s last user turn asks for that its
    answer states; [] when it asks none or misses one (a wrong row is not
    worth more copies)."""
    query = next((m["content"] for m in reversed(example["messages"]) if m["role"] == "user"), "")
    asked = facts.applicable(checks, query)
    if not asked or not all(facts.states(f, example["answer"]) for f in asked):
        return []
    return [f.name for f in asked]


def repeat_fact_rows(
    examples: Sequence[Example], checks: Sequence[facts.FactCheck], repeat: int
) -> tuple[list[Example], list[str]]:
    """`examples` with each row that states the facts its query asks
    (`stated_facts`) there `repeat` times in all, the copies next to their
    row (the trainer shuffles). Returns (examples, the facts those rows
    state, once each)."""
    out: list[Example] = []
    covered: dict[str, None] = {}
    for example in examples:
        names = stated_facts(example, checks) if repeat > 1 and checks else []
        covered.update(dict.fromkeys(names))
        out.extend([example] * (repeat if names else 1))
    return out, list(covered)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


def split_ids(tokenizer: Any, prompts: list[str], fulls: list[str]) -> list[tuple[list[int], int]]:
    """(full ids, index of the first completion token). The chat template
    already holds the special tokens, so none are added here."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    # Tokens can merge across the prompt/answer boundary; the completion then
    # starts where the two tokenizations diverge.
    return [(list(f), _common_prefix(p, f)) for p, f in zip(p_ids, f_ids, strict=True)]


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int, teacher: bool = False
) -> tuple[list[dict[str, list[int]]], int]:
    """Student features rendered WITHOUT a system prompt: `input_ids` and
    `labels` (-100 on prompt tokens; answer + end-of-turn trained), truncated
    to max_length (keep start). With teacher=True, also the teacher rendering
    (WITH ex["system_prompt"]) and masks marking the answer tokens the two
    renderings share (`kl_mask`, `teacher_kl_mask`, same count per example).
    Returns (features, number of examples skipped because the prompt alone
    fills max_length)."""
    student = [
        prompt_completion(tokenizer, ex["messages"], ex["answer"], system_prompt=None) for ex in examples
    ]
    s_split = split_ids(tokenizer, [p for p, _ in student], [p + c for p, c in student])
    t_split: list[tuple[list[int], int]] = []
    if teacher:
        rendered = [
            prompt_completion(tokenizer, ex["messages"], ex["answer"], system_prompt=ex.get("system_prompt"))
            for ex in examples
        ]
        t_split = split_ids(tokenizer, [p for p, _ in rendered], [p + c for p, c in rendered])
    features: list[dict[str, list[int]]] = []
    skipped = 0
    for i, (ids, start) in enumerate(s_split):
        if start >= max_length or start >= len(ids):
            skipped += 1
            continue
        ids = ids[:max_length]
        feat = {"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]}
        if teacher:
            t_ids, t_start = t_split[i]
            s_comp, t_comp = s_split[i][0][start:], t_ids[t_start:]
            # Align from the end: the answer tokens are the same in both
            # renderings except, rarely, a merge at the boundary.
            k = _common_suffix(s_comp, t_comp)
            a_s, a_t = start + len(s_comp) - k, t_start + len(t_comp) - k
            n = max(0, min(k, len(ids) - a_s))
            t_ids = t_ids[: a_t + n]
            feat["kl_mask"] = [0] * a_s + [1] * n + [0] * (len(ids) - a_s - n)
            feat["teacher_input_ids"] = t_ids
            feat["teacher_kl_mask"] = [0] * a_t + [1] * n
        features.append(feat)
    return features, skipped


def tokenizers_match(a: Path | str, b: Path | str) -> bool:
    """Whether two models' tokenizers map every token to the same id (what a
    token-level KL between them needs)."""
    from transformers import AutoTokenizer

    ta, tb = (AutoTokenizer.from_pretrained(str(d), trust_remote_code=False) for d in (a, b))
    return bool(ta.get_vocab() == tb.get_vocab())


# ---------------------------------------------------------------- the loss over these features


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where the student predicts a trained token: logits at t predict t+1."""
    return labels[:, 1:] != IGNORE_INDEX


def teacher_positions(teacher_kl_mask: torch.Tensor) -> torch.Tensor:
    """Where the teacher predicts an answer token the student also reads."""
    return teacher_kl_mask[:, 1:].bool()


def distill_terms(
    logits: torch.Tensor,
    t_logits: torch.Tensor,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    temperature: float,
    denom: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, KL(teacher || student)) summed over answer tokens and
    divided by `denom`. `logits` are the student's at `answer_positions`,
    `t_logits` the teacher's at `teacher_positions`, in the same order."""
    import torch.nn.functional as F

    sel = answer_positions(labels)
    kl_rows = kl_mask[:, 1:][sel].bool()
    if int(kl_rows.sum()) != t_logits.shape[0]:
        raise RuntimeError("student and teacher answer tokens are misaligned")
    ce = F.cross_entropy(logits, labels[:, 1:][sel], reduction="sum") / denom
    s_logp = F.log_softmax(logits[kl_rows] / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    # T^2 keeps the gradient scale independent of the temperature (Hinton et al.).
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * temperature * temperature / denom
    return ce, kl
