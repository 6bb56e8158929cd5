"""Reward-model losses and pair metrics, as pure functions on tensors.

A reward model r(x, y) reads a prompt x and a response y and returns one scalar (the score head at the
response's last token). DeepSeek-V2 (arXiv 2405.04434, section 3.2) initialises its reward models from the
SFT model and trains them "point-wise or pair-wise"; DeepSeekMath trains its reward model at lr 2e-5.

Pair-wise (Bradley-Terry): with r_c = r(x, y_chosen), r_r = r(x, y_rejected) and an optional margin m
(Llama-2's margin loss; m = 0 is plain Bradley-Terry),

    P(y_chosen > y_rejected) = sigmoid(r_c - r_r)
    loss = mean_i -log sigmoid(r_c,i - r_r,i - m_i) = mean_i softplus(-(r_c,i - r_r,i - m_i))

Point-wise: each response has a label y_i, either a real-valued score (mean squared error) or a 0/1 verdict
such as "the answer is correct" (binary cross-entropy on the logit r_i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Bradley-Terry loss  mean_i -log sigmoid(r_c,i - r_r,i - m_i).

    Args:
        chosen: [P] rewards of the preferred responses, with gradient.
        rejected: [P] rewards of the other responses of the same prompts.
        margin: [P] how much higher the chosen reward should be, or None for 0.

    Returns:
        scalar loss. softplus(-z) = -log sigmoid(z), computed without overflow for large |z|.
    """
    difference = chosen.float() - rejected.float()
    if margin is not None:
        difference = difference - margin.float()
    return F.softplus(-difference).mean()


def pointwise_mse(rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error  mean_i (r_i - y_i)^2.  rewards, labels: [N]."""
    return (rewards.float() - labels.float()).pow(2).mean()


def pointwise_bce(rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on the reward as a logit, labels y_i in {0, 1}:

        loss = mean_i -[y_i log sigmoid(r_i) + (1 - y_i) log(1 - sigmoid(r_i))]

    rewards, labels: [N]."""
    return F.binary_cross_entropy_with_logits(rewards.float(), labels.float())


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """accuracy = mean_i 1[r_c,i > r_r,i] (ties count as wrong); margin = mean_i (r_c,i - r_r,i);
    and the mean chosen and rejected rewards. chosen, rejected: [P]."""
    difference = (chosen - rejected).detach().float()
    return {"accuracy": (difference > 0).float().mean().item(), "margin": difference.mean().item(),
            "reward_chosen": chosen.detach().float().mean().item(),
            "reward_rejected": rejected.detach().float().mean().item()}


def pointwise_metrics(rewards: torch.Tensor, labels: torch.Tensor, binary: bool) -> dict[str, float]:
    """Mean reward; for 0/1 labels also accuracy = mean_i 1[(r_i > 0) == y_i] (the logit's decision)."""
    rewards = rewards.detach().float()
    metrics = {"reward_mean": rewards.mean().item()}
    if binary:
        metrics["accuracy"] = ((rewards > 0).float() == labels.float()).float().mean().item()
    return metrics
