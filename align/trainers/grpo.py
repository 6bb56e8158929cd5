"""`align grpo`: the single-controller GRPO driver (DeepSeekMath / DeepSeek-V2 RL, critic-free).

One step reads like the algorithm:

    prompts     = sampler.next(P)
    completions = rollout engines sample G outputs per prompt, with their log-probs
    rewards     = r = sum_k c_k R_k(prompt, completion)                      [P, G]
    advantages  = (r - mean_group(r)) / std_group(r)                          [P, G]
    update      = learners take `updates_per_batch` clipped-surrogate steps (k3 KL to the reference)
    sync        = the new policy weights go to the rollout engines

Each phase is one call on a Ray actor group and is timed. The driver holds no model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from align import checkpoint
from align.config.grpo_schema import GRPORecipe
from align.config.loader import to_dict
from align.data.prompts import Prompt, PromptSampler, load_prompts
from align.distributed.worker_group import WorkerGroup, start_ray, worker_env
from align.metrics import MetricsLog, plot_curves
from align.models.loading import load_tokenizer
from align.rl.advantages import group_advantages, handle_truncated, select_informative_groups, zero_std_groups
from align.trainers.grpo_learner import GRPOLearner
from align.trainers.reward_pool import RewardPool
from align.trainers.rollout_batch import ScoredGroups, fill_batch, rollout_tensors, split_shards
from rewards.base import Sample
from rewards.combine import combine_rewards
from rewards.registry import build, score
from rollout.engines import choose_engine, make_engine
from rollout.torch_engine import Completion, SamplingConfig


class Phases:
    """Wall time per phase of the current step (a phase entered twice, as in refills, adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        yield
        key = f"time/{name}_s"
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started


class RewardFailure(RuntimeError):
    """Too many samples went without a valid reward: the run stops (after saving the policy)."""


def sampling_metrics(sampled: ScoredGroups, values: dict[str, list[float | None]]) -> dict[str, float]:
    """What the policy produced this step, over every sampled completion (refills included); rewards over
    the samples that have one."""
    lengths = torch.tensor([len(c.token_ids) for c in sampled.completions], dtype=torch.float32)
    valid = sampled.rewards[~sampled.rewards.isnan()]
    per_reward = {}
    for name, column in values.items():
        present = [v for v in column if v is not None]
        per_reward[f"reward/{name}"] = sum(present) / len(present) if present else float("nan")
        per_reward[f"reward_missing/{name}"] = len(column) - len(present)
    return {**per_reward, "reward_missing/total": int(sampled.rewards.isnan().sum()),
            "reward/mean": valid.mean().item() if valid.numel() else float("nan"),
            "reward/std": valid.std().item() if valid.numel() > 1 else 0.0,
            "zero_std_groups": zero_std_groups(sampled.rewards).float().mean().item(),
            "completion_length": lengths.mean().item(),
            "truncated": 1 - sum(c.finished for c in sampled.completions) / len(sampled.completions)}


@dataclass
class PendingRollout:
    prompts: list[Prompt]
    chunks: list[list[int]]  # prompt indices per engine
    refs: list[Any]  # one Ray reference per engine


class GRPORun:
    def __init__(self, recipe: GRPORecipe):
        self.recipe = recipe
        self.pending: PendingRollout | None = None
        self.tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
        data = recipe.data
        self.sampler = PromptSampler(
            load_prompts(data.train, self.tokenizer, data.prompt_key, data.answer_key, data.max_prompt_length),
            data.seed)
        self.heldout = load_prompts([data.heldout], self.tokenizer, data.prompt_key, data.answer_key,
                                    data.max_prompt_length, data.heldout_limit) if data.heldout else []
        cluster, rollout = recipe.cluster, recipe.rollout
        start_ray(cluster.ray_address,
                  cluster.num_workers * cluster.cpus_per_worker + rollout.num_workers * rollout.cpus_per_worker
                  + sum(r.num_workers * r.cpus_per_worker for r in recipe.rewards),
                  cluster.num_workers * cluster.gpus_per_worker + rollout.num_workers * rollout.gpus_per_worker
                  + sum(r.num_workers * r.gpus_per_worker for r in recipe.rewards))
        self.colocated = rollout.placement == "colocated"
        hosted = [len(range(i, rollout.num_workers, cluster.num_workers)) for i in range(cluster.num_workers)]
        engine_share = [{"CPU": n * rollout.cpus_per_worker, "GPU": n * rollout.gpus_per_worker} for n in hosted]
        self.learners = WorkerGroup("grpo-learners", cluster.num_workers, cluster.cpus_per_worker,
                                    cluster.gpus_per_worker, cluster.placement,
                                    worker_env(cluster.threads_per_worker), cluster.call_timeout_s,
                                    reserve_extra=engine_share if self.colocated else None)
        self.engines = WorkerGroup("rollout", rollout.num_workers, rollout.cpus_per_worker, rollout.gpus_per_worker,
                                   cluster.placement, worker_env(rollout.threads_per_worker), cluster.call_timeout_s,
                                   colocate_with=self.learners if self.colocated else None)
        self.rewards = RewardPool(recipe.rewards, cluster.placement, worker_env(1))
        self.missing_rewards: deque[tuple[int, int]] = deque(maxlen=recipe.reward_faults.window)
        address, port = self.learners.rendezvous()
        world = cluster.num_workers
        self.learners.construct(GRPOLearner, [
            {"recipe": recipe, "rank": rank, "world_size": world, "master_addr": address, "master_port": port}
            for rank in range(world)])
        self.engine_kind = choose_engine(rollout.engine, recipe.model, on_gpu=rollout.gpus_per_worker > 0)
        self.engines.construct(make_engine, [{"model_config": recipe.model, "engine": self.engine_kind,
                                              "threads": rollout.threads_per_worker, **rollout.vllm_options()}]
                               * rollout.num_workers)
        self.sync_weights()

    def sync_weights(self) -> None:
        """Learners gather the policy (collective); rank 0's copy goes to every engine via the object store."""
        state_refs = self.learners.submit("policy_state")
        self.engines.wait(self.engines.submit("update_weights", state_refs[0]), "update_weights")
        self.learners.wait(state_refs, "policy_state")

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig) -> list[Completion]:
        return self.collect(self.submit_generate(prompts, sampling))

    def submit_generate(self, prompts: list[Prompt], sampling: SamplingConfig) -> PendingRollout:
        """Start sampling: prompts split evenly over the engines, each with its own seed (returns at once)."""
        engines = len(self.engines)
        chunks = [list(range(len(prompts)))[i::engines] for i in range(engines)]
        refs = self.engines.submit_each("generate", [
            ([prompts[i].token_ids for i in chunk], dataclasses.replace(sampling, seed=sampling.seed + e * 10**12))
            for e, chunk in enumerate(chunks)])
        return PendingRollout(prompts, chunks, refs)

    def collect(self, pending: PendingRollout) -> list[Completion]:
        """Wait for a started rollout; completions come back in prompt order."""
        results = self.engines.wait(pending.refs, "generate")
        chunks = pending.chunks
        by_prompt: dict[int, list[Completion]] = {}
        for chunk, result in zip(chunks, results):
            for completion in result:
                completion.prompt_index = chunk[completion.prompt_index]
                by_prompt.setdefault(completion.prompt_index, []).append(completion)
        return [completion for index in range(len(pending.prompts)) for completion in by_prompt[index]]

    def heldout_accuracy(self, max_new_tokens: int) -> float | None:
        """Mean `data.heldout_reward` of greedy completions of the held-out prompts (scored in the driver;
        a sample without a score counts 0)."""
        if not self.heldout:
            return None
        completions = self.generate(self.heldout, SamplingConfig(n=1, max_new_tokens=max_new_tokens, temperature=0))
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        name = self.recipe.data.heldout_reward
        scores = score(name, build(name, {}), [Sample(self.heldout[c.prompt_index].messages, text,
                                                      self.heldout[c.prompt_index].row, len(c.token_ids))
                                               for c, text in zip(completions, texts)])
        return sum(v or 0.0 for v in scores.values) / len(scores.values)

    def submit_rollout(self, step: int, refill: int = 0) -> PendingRollout:
        """Draw P new prompts and start sampling G completions of each (refill > 0: dynamic sampling's
        extra rollouts of step `step`, each with its own seed)."""
        recipe, algo = self.recipe, self.recipe.algorithm
        sampling = SamplingConfig(n=algo.group_size, max_new_tokens=recipe.rollout.max_new_tokens,
                                  temperature=recipe.rollout.temperature, top_p=recipe.rollout.top_p,
                                  seed=algo.seed * 1_000_003 + step + refill * 1_000_000_007)
        return self.submit_generate(self.sampler.next(algo.prompts_per_step), sampling)

    def sample(self, pending: PendingRollout, phases: Phases) -> tuple[ScoredGroups, dict[str, list[float | None]]]:
        """Wait for a started rollout and score it: r = sum_k c_k R_k, NaN where a reward failed (unless the
        recipe gives a fallback); truncated outputs follow the recipe's rule."""
        recipe, algo = self.recipe, self.recipe.algorithm
        with phases("rollout"):
            completions = self.collect(pending)
        with phases("rewards"):
            texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
            prompts = pending.prompts
            scored = self.rewards.score([Sample(prompts[c.prompt_index].messages, text, prompts[c.prompt_index].row,
                                                len(c.token_ids)) for c, text in zip(completions, texts)])
            for error in scored.errors:
                tqdm.write(f"align grpo: {error}", file=sys.stderr)
            rewards, _ = combine_rewards(scored.values, {spec.name: spec.weight for spec in recipe.rewards},
                                         recipe.reward_faults.fallback)
            truncated = torch.tensor([not c.finished for c in completions])
            rewards, in_loss = handle_truncated(rewards, torch.ones(len(completions), 1), truncated,
                                                algo.truncated, algo.truncation_penalty)
            in_loss = in_loss.squeeze(1) * ~rewards.isnan()
        shape = (len(prompts), algo.group_size)
        return ScoredGroups(prompts, completions, rewards.view(shape), in_loss.view(shape)), scored.values

    def check_reward_failures(self, metrics: dict[str, Any]) -> None:
        """Stop when more than `max_failure_rate` of the last `window` steps' samples had no valid reward."""
        faults = self.recipe.reward_faults
        self.missing_rewards.append((metrics["reward_missing/total"], metrics["completions"]))
        missing, total = (sum(column) for column in zip(*self.missing_rewards))
        if total and missing / total > faults.max_failure_rate:
            broken = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("reward_missing/") and v}
            raise RewardFailure(f"{missing} of {total} samples in the last {len(self.missing_rewards)} steps had no "
                                f"valid reward (reward_faults.max_failure_rate {faults.max_failure_rate}); missing "
                                f"per reward in the last step: {broken}")

    def refill(self, sampled: ScoredGroups, values: dict[str, list[float | None]], step: int, phases: Phases
               ) -> tuple[ScoredGroups, ScoredGroups, dict[str, list[float | None]], int]:
        """DAPO dynamic sampling: while fewer than P groups have unequal rewards, sample P more prompts
        (at most `max_refills` times). Returns (train batch, everything sampled, its reward values, refills)."""
        algo = self.recipe.algorithm
        refills = 0
        while len(select_informative_groups(sampled.rewards)) < algo.prompts_per_step and refills < algo.max_refills:
            refills += 1
            more, more_values = self.sample(self.submit_rollout(step, refills), phases)
            sampled = ScoredGroups.concat([sampled, more])
            values = {name: values[name] + more_values[name] for name in values}
        informative = select_informative_groups(sampled.rewards).tolist()
        return fill_batch(sampled, informative, algo.prompts_per_step), sampled, values, refills

    def step(self, step: int) -> dict[str, Any]:
        algo = self.recipe.algorithm
        phases = Phases()
        pending, self.pending = self.pending or self.submit_rollout(step), None
        batch, values = self.sample(pending, phases)
        if algo.overlap_rollout and step + 1 < algo.steps:
            # The engines sample the next batch with the current weights while the learners update on this
            # one; the weight sync below queues behind that sampling, so each batch is one update stale.
            self.pending = self.submit_rollout(step + 1)
        sampled, extra = batch, {}
        if algo.dynamic_sampling:
            batch, sampled, values, refills = self.refill(batch, values, step, phases)
            extra = {"dynamic_sampling/refills": refills,
                     "dynamic_sampling/filler_groups": int((batch.in_loss.sum(1) == 0).sum())}
        with phases("advantages"):
            input_ids, mask, rollout_logp = rollout_tensors(batch.prompts, batch.completions,
                                                            self.tokenizer.pad_token_id)
            mask = mask * batch.in_loss.flatten()[:, None]
            valid = ~batch.rewards.isnan()  # [P, G], False where a reward call failed
            advantages = group_advantages(batch.rewards, algo.advantage_scale, valid=valid).flatten()  # [P * G]
            shards = split_shards(input_ids, mask, rollout_logp, advantages, len(self.learners))
        with phases("update"):
            if self.colocated:  # free the shared device for the update (vLLM sleep mode on GPU)
                self.engines.call("sleep")
            per_rank = self.learners.call_each("update", [(shard,) for shard in shards])
        with phases("sync"):
            if self.colocated:
                self.engines.call("wake_up")
            self.sync_weights()
            if algo.reference_reset_every and (step + 1) % algo.reference_reset_every == 0:
                self.learners.call("reset_reference")
        step_s = sum(phases.seconds.values())
        learner = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in per_rank[0]}
        return {**learner, **phases.seconds, **extra, **sampling_metrics(sampled, values),
                "completions": len(sampled.completions), "completions_per_s": len(sampled.completions) / step_s,
                "tokens_per_s": sum(len(c.token_ids) for c in sampled.completions) / step_s, "step_s": step_s}

    def shutdown(self) -> None:
        self.learners.shutdown()
        self.engines.shutdown()
        self.rewards.shutdown()


def run_grpo(recipe: GRPORecipe) -> dict[str, Any]:
    run_dir = Path(recipe.output.dir)
    if (run_dir / "metrics.jsonl").exists() and not recipe.output.overwrite:
        raise FileExistsError(f"{run_dir} already holds a run; set output.overwrite=true to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    run = GRPORun(recipe)
    print(f"align grpo: {len(run.learners)} learner(s), {len(run.engines)} {run.engine_kind} rollout engine(s)")
    log = MetricsLog(run_dir)
    try:
        max_new = recipe.rollout.max_new_tokens
        before = run.heldout_accuracy(max_new)
        bar = tqdm(range(recipe.algorithm.steps), desc="grpo", unit="step", dynamic_ncols=True)
        for step in bar:
            metrics = run.step(step)
            log.log(step + 1, metrics)
            try:
                run.check_reward_failures(metrics)
            except RewardFailure:
                staging = checkpoint.staging_dir(run_dir, "stopped")
                run.learners.call("export_hf", str(staging))
                checkpoint.commit(staging, run_dir / "stopped")
                raise
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl', 0):.4f}",
                            c_s=f"{metrics['completions_per_s']:.1f}")
        after = run.heldout_accuracy(max_new)
        staging = checkpoint.staging_dir(run_dir, "final")
        run.learners.call("export_hf", str(staging))
        final = checkpoint.commit(staging, run_dir / "final")
    finally:
        log.close()
        run.shutdown()
    plot = plot_curves(run_dir / "metrics.jsonl", ["reward/mean", "policy_loss", "kl", "completion_length"],
                       run_dir / "curves.png", f"align grpo: {run_dir.name}")
    summary = {"engine": run.engine_kind, "heldout_before": before, "heldout_after": after, "plot": str(plot),
               "model": str(final), "run_dir": str(run_dir)}
    if before is not None:
        print(f"align grpo: held-out {recipe.data.heldout_reward} {before:.1%} -> {after:.1%} "
              f"({len(run.heldout)} problems); "
              f"curves: {plot}")
    print(f"align grpo: done, {recipe.algorithm.steps} steps; model: {final}")
    return summary
