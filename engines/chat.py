"""The one rendering of a conversation into model text.

Teacher generation, training, evals and serving all call `render`, so a
variant sees byte-identical inputs everywhere (template parity).

What "no system prompt" means: the conversation is given to the model's own
chat template WITHOUT a system message. Templates that inject a default
system message (SmolLM2 adds "You are a helpful AI assistant named SmolLM...")
keep doing so, which is exactly what a client that sends no system message to
the serving endpoint gets; training on that same rendering means the student
is trained on what it will be served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engines.protocol import apply_system_prompt

Message = dict[str, str]


def render(
    tokenizer: Any,
    messages: Sequence[Message],
    system_prompt: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render messages (any system message in them is replaced by
    system_prompt; None means no system message at all)."""
    text = tokenizer.apply_chat_template(
        apply_system_prompt(messages, system_prompt),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return str(text)


def prompt_completion(
    tokenizer: Any,
    messages: Sequence[Message],
    answer: str,
    system_prompt: str | None = None,
) -> tuple[str, str]:
    """Split one training example into (prompt, completion) texts so that
    prompt + completion is exactly the template's rendering of the whole
    conversation, and the completion carries the template's end-of-turn."""
    prompt = render(tokenizer, messages, system_prompt, add_generation_prompt=True)
    full = render(
        tokenizer,
        [*messages, {"role": "assistant", "content": answer}],
        system_prompt,
        add_generation_prompt=False,
    )
    if not full.startswith(prompt):
        raise ValueError("chat template renders the prompt differently inside a full conversation")
    return prompt, full[len(prompt) :]
