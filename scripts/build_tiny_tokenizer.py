"""Train the tiny byte-level BPE tokenizer (data/tokenizer-tiny) on data/sft-tiny/train.jsonl.

The real DeepSeek vocabulary (about 129k tokens) would be most of a 5M-parameter model's weights, so the
tiny model gets its own 1024-token vocabulary with DeepSeek's special-token names and DeepSeek-V2's chat
format. Digits are split one per token: with multi-digit tokens a tiny model has to learn the sum of every
pair of digit chunks instead of ten digits and a carry.

After saving, the tokenizer is reloaded with AutoTokenizer and checked: text round-trips, and the
tokens of every rendered prompt are a prefix of the tokens of the conversation that answers it, for each
assistant turn of each training row, so SFT loss masks and GRPO rollouts split at the same token.

Run from the repository root after scripts/build_tiny_data.py:
    .venv/bin/python scripts/build_tiny_tokenizer.py
"""

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from align.models.tokenizers import DEEPSEEK_V2_CHAT_TEMPLATE

REPO_ROOT = Path(__file__).resolve().parent.parent
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"
VOCAB_SIZE = 1024  # specials included

# The DeepSeek-V2-Chat format, with generation markers (align/models/tokenizers.py); the markers render no
# text, and plain jinja2 (used below to render training text) does not know them.
CHAT_TEMPLATE = DEEPSEEK_V2_CHAT_TEMPLATE
PLAIN_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")

Message = dict[str, str]


def load_conversations(path: Path) -> list[list[Message]]:
    """The `messages` of every row of an SFT jsonl file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f]


def raise_exception(message: str) -> NoReturn:
    """Lets the template reject bad roles while rendering training text, as transformers' renderer does."""
    raise ValueError(message)


def training_texts(conversations: list[list[Message]]) -> Iterator[str]:
    """Conversations rendered by the chat template, so "User:"/"Assistant:" get merges of their own, cut at
    the special tokens, which the BPE trainer would otherwise split into bytes and learn merges for."""
    template = jinja2.Environment().from_string(PLAIN_TEMPLATE)
    special = re.compile("|".join(re.escape(token) for token in (BOS, EOS, PAD)))
    for messages in conversations:
        text = template.render(messages=messages, bos_token=BOS, eos_token=EOS,
                               add_generation_prompt=False, raise_exception=raise_exception)
        yield from (piece for piece in special.split(text) if piece)


def train_bpe(conversations: list[list[Message]]) -> Tokenizer:
    """Byte-level BPE whose pre-tokenizer isolates each digit before the GPT-2 split, so no merge can
    contain a digit."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_texts(conversations), trainer=trainer)
    return tokenizer


def save(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Wrap in transformers' fast tokenizer with the DeepSeek special tokens and chat template, then save."""
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                      pad_token=PAD, clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out_dir)


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as-is: rendered chats carry their own BOS."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def check_vocabulary(tokenizer: Any) -> None:
    """Size, special-token ids, and that digits only ever appear as single-character tokens."""
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    with_digits = [tok for tok in tokenizer.get_vocab() if re.search(r"\d", tok) and len(tok) > 1]
    assert not with_digits, with_digits[:10]


def check_round_trip(tokenizer: Any, conversations: list[list[Message]]) -> None:
    """Every message text decodes back to itself (byte-level BPE should never lose a character)."""
    texts = [message["content"] for messages in conversations for message in messages]
    decoded = tokenizer.batch_decode(encode(tokenizer, texts))
    broken = [text for text, back in zip(texts, decoded, strict=True) if text != back]
    assert not broken, f"{len(broken)} texts do not round-trip, e.g. {broken[0]!r}"


def prefix_violations(tokenizer: Any, conversations: list[list[Message]]) -> tuple[int, int]:
    """(rows, turns) where the prompt's tokens are not a prefix of the answered conversation's tokens."""
    prompts, fulls, row_of_turn = [], [], []
    for row, messages in enumerate(conversations):
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompts.append(tokenizer.apply_chat_template(messages[:turn], tokenize=False,
                                                         add_generation_prompt=True))
            fulls.append(tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False))
            row_of_turn.append(row)
    bad_turn_rows = [row for row, prompt_ids, full_ids in
                     zip(row_of_turn, encode(tokenizer, prompts), encode(tokenizer, fulls), strict=True)
                     if full_ids[: len(prompt_ids)] != prompt_ids]
    return len(set(bad_turn_rows)), len(bad_turn_rows)


def report(tokenizer: Any, conversations: list[list[Message]]) -> None:
    """Token statistics of the rendered training rows and one example, for the build log."""
    rendered = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    lengths = [len(ids) for ids in encode(tokenizer, rendered)]
    first = encode(tokenizer, rendered[:1])[0]
    assert first[0] == tokenizer.bos_token_id and first.count(tokenizer.bos_token_id) == 1
    print(f"rows {len(lengths)}, tokens per row mean {sum(lengths) / len(lengths):.1f}, "
          f"max {max(lengths)}, total {sum(lengths)}")
    print("example:", tokenizer.convert_ids_to_tokens(first)[:40])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "sft-tiny" / "train.jsonl")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data" / "tokenizer-tiny")
    args = parser.parse_args(argv)

    conversations = load_conversations(args.data)
    save(train_bpe(conversations), args.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.out_dir)
    check_vocabulary(tokenizer)
    check_round_trip(tokenizer, conversations)
    bad_rows, bad_turns = prefix_violations(tokenizer, conversations)
    print(f"prompt-prefix violations: {bad_rows} rows, {bad_turns} assistant turns")
    report(tokenizer, conversations)
    if bad_rows:
        raise SystemExit("the chat template's prompt does not tokenize as a prefix of the full conversation")


if __name__ == "__main__":
    main(sys.argv[1:])
