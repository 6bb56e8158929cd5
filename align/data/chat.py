"""Chat samples -> token ids with a loss mask on assistant tokens only (every assistant turn).

The mask is found by rendering the conversation with the tokenizer's own chat template at each turn
boundary, so it works for any template (DeepSeek's, the tiny one, Llama's) without `{% generation %}`
markers: the tokens between "prompt up to turn i + generation prompt" and "conversation up to turn i"
are what the model must learn to produce for turn i, end-of-turn token included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align.data.sources import DataError

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    origin: str
    truncated: bool = False


def check_messages(messages: Any, origin: str, key: str = "messages") -> list[dict[str, str]]:
    """Validate the chat structure; raise DataError naming the row and the problem."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{origin}: '{key}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{origin}: {key}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{origin}: {key}[{i}].role {message['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{origin}: {key}[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{origin}: '{key}' has no assistant message to learn from")
    return messages


def render_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, origin: str = ""
               ) -> list[int]:
    """Token ids of the chat template's rendering (the template writes BOS itself)."""
    import jinja2

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:
        raise DataError(f"{origin}: the chat template rejects this conversation: {err}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(tokenizer: Any, messages: list[dict], max_length: int, origin: str = "") -> Sample:
    """Tokenize a conversation; labels are the token ids of assistant turns, IGNORE_INDEX elsewhere."""
    input_ids = render_ids(tokenizer, messages, origin=origin)
    labels = [IGNORE_INDEX] * len(input_ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_ids(tokenizer, messages[:turn], add_generation_prompt=True))
        end_ids = render_ids(tokenizer, messages[: turn + 1])
        if input_ids[: len(end_ids)] != end_ids or start > len(end_ids):
            raise DataError(f"{origin}: the chat template does not render turn {turn} as a prefix of the "
                            "whole conversation; assistant tokens cannot be located")
        labels[start : len(end_ids)] = input_ids[start : len(end_ids)]
    truncated = len(input_ids) > max_length
    return Sample(input_ids[:max_length], labels[:max_length], origin, truncated)


def has_targets(sample: Sample) -> bool:
    """True when at least one label survives truncation (otherwise the sample teaches nothing)."""
    return any(label != IGNORE_INDEX for label in sample.labels[1:])
