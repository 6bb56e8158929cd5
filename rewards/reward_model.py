"""`reward_model`: a trained reward model as a reward (DeepSeek-V2's R_helpful / R_safety / reasoning RM).

Any local transformers checkpoint with a one-output sequence-classification head loads: what `align rm`
exports, or a third-party reward model saved to disk (hub ids are never downloaded). Each sample is scored
as the chat-template rendering of its prompt messages followed by the completion as an assistant turn, the
same function `align rm` trains with (align/data/preferences.py: `scored_ids`), so the model reads served
text exactly as it read its training pairs.

    rewards:
      - name: reward_model
        weight: 0.5
        args: {path: runs/rm-tiny/final, normalize: batch}
        gpus_per_worker: 1        # on GPU machines; the model then runs on cuda

The score is the head's output at the last token that is not the pad token (transformers' pooling): batches
are right-padded with the tokenizer's pad id, and the config's pad id is set to it. A tokenizer whose pad is
its end-of-text token is read at the token before the trailing end-of-text, in training and here alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch

from align.data.preferences import Example, collate, scored_ids
from rewards.base import Sample, Scores

Normalize = Literal["none", "batch", "running"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RunningMoments:
    """Mean and variance of every score seen so far, merged batch by batch (Chan et al.'s parallel update):

        n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta * n_b / n,
        M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,  var = M2 / n
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        if not values:
            return
        n_b = len(values)
        mean_b = sum(values) / n_b
        m2_b = sum((v - mean_b) ** 2 for v in values)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


def standardize(values: list[float], mean: float, std: float, eps: float = 1e-6) -> list[float]:
    """(v - mean) / std; all zeros when std is (nearly) zero, as no value stands out."""
    return [0.0 if std < eps else (v - mean) / std for v in values]


def normalize_scores(raw: list[float], mode: Normalize, running: RunningMoments) -> list[float]:
    """none: the raw scores; batch: z-scores within this call; running: z-scores against the mean and std of
    every score this instance has produced, this call included (updated first)."""
    if mode == "none" or not raw:
        return list(raw)
    if mode == "batch":
        mean = sum(raw) / len(raw)
        return standardize(raw, mean, math.sqrt(sum((v - mean) ** 2 for v in raw) / len(raw)))
    running.update(raw)
    return standardize(raw, running.mean, running.std)


class RewardModel:
    """Scores samples with a local reward model; built once per Ray reward worker, then called per batch.

    Args:
        path: local directory of a transformers sequence-classification checkpoint with num_labels=1 and a
            tokenizer with a chat template (what `align rm` writes to RUN_DIR/final).
        batch_size: sequences per forward pass (similar lengths are batched together).
        max_length: tokens per prompt + completion; longer ones keep their last tokens (as in training).
        normalize: none | batch (z-score within each call) | running (z-score against all scores so far).
            With several reward workers each keeps its own statistics and sees only its share of a batch.
        dtype: float32 or bfloat16.
        device: torch device; default cuda when available (RewardSpec.gpus_per_worker > 0), else cpu.

    `info` per sample: {"raw_score": the model's output before normalisation}.
    """

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, normalize: Normalize = "none",
                 dtype: str = "float32", device: str | None = None):
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise ValueError(f"reward_model: {path!r} is not a local model directory (no config.json); "
                             "train one with `align rm` or save a model there (hub ids are not downloaded)")
        if normalize not in ("none", "batch", "running"):
            raise ValueError(f"reward_model: normalize must be none, batch or running, got {normalize!r}")
        if dtype not in DTYPES:
            raise ValueError(f"reward_model: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        from transformers import AutoModelForSequenceClassification

        from align.models.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(str(directory))
        self.model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=DTYPES[dtype])
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward_model: {path} has {self.model.config.num_labels} outputs; a reward model "
                             "has one (num_labels=1)")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size, self.max_length, self.normalize = batch_size, max_length, normalize
        self.running = RunningMoments()

    @torch.no_grad()
    def raw_scores(self, samples: list[Sample]) -> list[float]:
        """The model's score of each sample, in order."""
        ids = [scored_ids(self.tokenizer, s.prompt, s.completion, self.max_length)[0] for s in samples]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = collate([Example([ids[i]], 0.0, None, 0) for i in chunk], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=batch.input_ids.to(self.device),
                                attention_mask=batch.attention_mask.to(self.device), use_cache=False).logits
            for index, value in zip(chunk, logits[:, 0].float().cpu().tolist()):
                scores[index] = value
        return scores

    def __call__(self, samples: list[Sample]) -> Scores:
        raw = self.raw_scores(samples)
        values = normalize_scores(raw, self.normalize, self.running)
        return Scores(values, [{"raw_score": score} for score in raw])
