"""`align grpo`: the single-controller GRPO driver (DeepSeekMath / DeepSeek-V2 RL, critic-free).

One step reads like the algorithm:

    prompts     = sampler.next(P)
    completions = rollout engines sample G outputs per prompt, with their log-probs; with max_staleness k
                  they sample up to k batches ahead, while the learners update (AReaL's decoupled objective
                  then corrects the stale ones)
    rewards     = r = sum_k c_k R_k(prompt, completion)                      [P, G]
    advantages  = (r - mean_group(r)) / std_group(r)                          [P, G]
    update      = learners take `updates_per_batch` clipped-surrogate steps (k3 KL to the reference)
    sync        = the new policy weights go to the rollout engines

Each phase is one call on a Ray actor group and is timed. The driver holds no model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from align import checkpoint
from align.config.grpo_schema import GRPORecipe
from align.config.loader import to_dict
from align.data.prompts import Prompt, PromptSampler, PromptSets, load_prompt_sets
from align.distributed.worker_group import WorkerError, WorkerGroup, start_ray, wait_built, worker_env
from align.metrics import JsonlLog, MetricsLog, plot_curves
from align.models.loading import load_tokenizer
from align.rl.advantages import group_advantages, handle_truncated, select_informative_groups, zero_std_groups
from align.trainers.grpo_learner import GRPOLearner, merge_learner_metrics
from align.trainers.learner_group import export_model, save_checkpoint, truncate_metrics
from align.trainers.reward_pool import RewardPool
from align.trainers.rollout_batch import (
    ScoredGroups,
    completion_steps,
    fill_batch,
    process_informative_groups,
    process_token_advantages,
    rollout_tensors,
    split_shards,
)
from align.trainers.rollout_pool import PendingRollout, RolloutPool
from align.trainers.run_control import RunControl
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


def heldout_reward_args(recipe: GRPORecipe) -> dict[str, Any]:
    """data.heldout_reward_args, else the args of the `rewards` entry with the held-out reward's name, else {}."""
    if recipe.data.heldout_reward_args is not None:
        return recipe.data.heldout_reward_args
    return next((spec.args for spec in recipe.rewards if spec.name == recipe.data.heldout_reward), {})


class GRPORun:
    def __init__(self, recipe: GRPORecipe, prompts: PromptSets | None = None):
        self.recipe = recipe
        # the rollouts of the next max_staleness steps, already started: (sampler position before its prompts
        # were drawn, rollout), in step order
        self.ahead: deque[tuple[int, PendingRollout]] = deque()
        self.heldout_before: float | None = None
        self.heldout_scorer: Any = None  # data.heldout_reward, built (with its args) at its first use
        self.tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
        prompts = prompts or load_prompt_sets(recipe.data, self.tokenizer)
        self.sampler, self.heldout = PromptSampler(prompts.train, recipe.data.seed), prompts.heldout
        cluster, rollout = recipe.cluster, recipe.rollout
        start_ray(cluster.ray_address,
                  cluster.num_workers * cluster.cpus_per_worker + rollout.num_workers * rollout.cpus_per_worker
                  + sum(r.num_workers * r.cpus_per_worker for r in recipe.rewards),
                  cluster.num_workers * cluster.gpus_per_worker + rollout.num_workers * rollout.gpus_per_worker
                  + sum(r.num_workers * r.gpus_per_worker for r in recipe.rewards))
        self.colocated = rollout.placement == "colocated"
        hosted = [len(range(i, rollout.num_workers, cluster.num_workers)) for i in range(cluster.num_workers)]
        engine_share = [{"CPU": n * rollout.cpus_per_worker, "GPU": n * rollout.gpus_per_worker} for n in hosted]
        self.missing_rewards: deque[tuple[int, int]] = deque(maxlen=recipe.reward_faults.window)
        self.control = RunControl("align grpo", recipe.train.max_nonfinite_in_row)
        self.reward_restarts = 0
        self.engine_kind = choose_engine(rollout.engine, recipe.model, on_gpu=rollout.gpus_per_worker > 0)
        self._groups: list[WorkerGroup] = []  # every group built, in order (`shutdown`)
        try:
            self._build_workers(recipe, engine_share)
            self.rollout = RolloutPool(self.engines, rollout.max_restarts)
            self.sync_weights(0)
        except BaseException:
            with contextlib.suppress(Exception):  # the build's own error is the one to report
                self.shutdown()
            raise

    def _build_workers(self, recipe: GRPORecipe, engine_share: list[dict[str, float]]) -> None:
        """Learners, reward workers and engines are built at the same time, each in its own processes (start-up
        is imports and model building; a GPU engine's start is tens of seconds); except that an engine waits for
        what shares its devices, as vLLM sizes its KV cache from the memory it finds free: colocated, the
        learners; the reward workers that hold GPUs."""
        cluster, rollout = recipe.cluster, recipe.rollout
        self.learners = self._track(WorkerGroup(
            "grpo-learners", cluster.num_workers, cluster.cpus_per_worker, cluster.gpus_per_worker, cluster.placement,
            worker_env(cluster.threads_per_worker), cluster.call_timeout_s,
            reserve_extra=engine_share if self.colocated else None))
        address, port = self.learners.rendezvous()
        world = cluster.num_workers
        self.learners.start(GRPOLearner, [
            {"recipe": recipe, "rank": rank, "world_size": world, "master_addr": address, "master_port": port}
            for rank in range(world)])
        self.rewards = RewardPool(recipe.rewards, cluster.placement, worker_env(1), wait=False)
        self._groups.extend(self.rewards.groups)
        before_engines = [self.learners] if self.colocated else []
        before_engines += [g for g, spec in zip(self.rewards.groups, recipe.rewards) if spec.gpus_per_worker > 0]
        wait_built(before_engines, at_least_s=cluster.call_timeout_s)
        self.engines = self._track(WorkerGroup(
            "rollout", rollout.num_workers, rollout.cpus_per_worker, rollout.gpus_per_worker, cluster.placement,
            worker_env(rollout.threads_per_worker), cluster.call_timeout_s,
            colocate_with=self.learners if self.colocated else None))
        # built in the dtype the policy computes in while it trains, so its log-probs are the learners'
        self.engines.start(make_engine, [{"model_config": recipe.policy_model, "engine": self.engine_kind,
                                          "threads": rollout.threads_per_worker, **rollout.vllm_options()}]
                           * rollout.num_workers)
        # the first failure in any of them stops the run
        wait_built([self.learners, self.engines, *self.rewards.groups], at_least_s=cluster.call_timeout_s)

    def _track(self, group: WorkerGroup) -> WorkerGroup:
        self._groups.append(group)
        return group

    def sync_weights(self, version: int) -> None:
        """Learners gather the policy (collective); rank 0's copy, `version` updates old, goes to every engine via
        the object store (behind the rollouts already submitted to them)."""
        state_refs = self.learners.submit("policy_state")
        self.rollout.push_weights(state_refs[0], version)
        self.learners.wait(state_refs, "policy_state")

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig) -> list[Completion]:
        return self.rollout.generate(prompts, sampling)

    def heldout_accuracy(self, max_new_tokens: int) -> float | None:
        """Mean `data.heldout_reward` of greedy completions of the held-out prompts (scored in the driver;
        a sample without a score counts 0)."""
        if not self.heldout:
            return None
        completions = self.generate(self.heldout, SamplingConfig(n=1, max_new_tokens=max_new_tokens, temperature=0))
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        name = self.recipe.data.heldout_reward
        if self.heldout_scorer is None:
            self.heldout_scorer = build(name, heldout_reward_args(self.recipe))
        scores = score(name, self.heldout_scorer, [Sample(self.heldout[c.prompt_index].messages, text,
                                                      self.heldout[c.prompt_index].row, len(c.token_ids))
                                               for c, text in zip(completions, texts)])
        return sum(v or 0.0 for v in scores.values) / len(scores.values)

    def submit_rollout(self, step: int, refill: int = 0) -> PendingRollout:
        """Draw P new prompts and start sampling G completions of each (refill > 0: dynamic sampling's
        extra rollouts of step `step`, each with its own seed)."""
        recipe, algo = self.recipe, self.recipe.algorithm
        sampling = SamplingConfig(n=algo.group_size, max_new_tokens=recipe.rollout.max_new_tokens,
                                  temperature=recipe.rollout.temperature, top_p=recipe.rollout.top_p,
                                  top_k=recipe.rollout.top_k,
                                  seed=algo.seed * 1_000_003 + step + refill * 1_000_000_007)
        return self.rollout.submit(self.sampler.next(algo.prompts_per_step), sampling)

    def sample(self, pending: PendingRollout, phases: Phases) -> tuple[ScoredGroups, dict[str, list[float | None]]]:
        """Wait for a started rollout and score it: r = sum_k c_k R_k, NaN where a reward failed (unless the
        recipe gives a fallback); truncated outputs follow the recipe's rule."""
        recipe, algo = self.recipe, self.recipe.algorithm
        with phases("rollout"):
            completions = self.rollout.collect(pending)
        with phases("rewards"):
            texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
            prompts = pending.prompts
            scored = self.rewards.score([Sample(prompts[c.prompt_index].messages, text, prompts[c.prompt_index].row,
                                                len(c.token_ids)) for c, text in zip(completions, texts)])
            for error in scored.errors:
                tqdm.write(f"align grpo: {error}", file=sys.stderr)
            self.reward_restarts += scored.restarts
            rewards, _ = combine_rewards(scored.values, {spec.name: spec.weight for spec in recipe.rewards},
                                         recipe.reward_faults.fallback)
            truncated = torch.tensor([not c.finished for c in completions])
            rewards, in_loss = handle_truncated(rewards, torch.ones(len(completions), 1), truncated,
                                                algo.truncated, algo.truncation_penalty)
            in_loss = in_loss.squeeze(1) * ~rewards.isnan()
            steps = None
            if algo.advantage == "process":
                weights = {spec.name: spec.weight for spec in recipe.rewards}
                steps = completion_steps(completions, texts, scored, rewards, weights, self.tokenizer)
        shape = (len(prompts), algo.group_size)
        return ScoredGroups(prompts, completions, rewards.view(shape), in_loss.view(shape), steps), scored.values

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
        while len(self.informative(sampled)) < algo.prompts_per_step and refills < algo.max_refills:
            refills += 1
            more, more_values = self.sample(self.submit_rollout(step, refills), phases)
            sampled = ScoredGroups.concat([sampled, more])
            values = {name: values[name] + more_values[name] for name in values}
        return fill_batch(sampled, self.informative(sampled), algo.prompts_per_step), sampled, values, refills

    def informative(self, sampled: ScoredGroups) -> list[int]:
        """The groups with a training signal: unequal rewards, or under process supervision unequal step rewards."""
        if self.recipe.algorithm.advantage == "process":
            return process_informative_groups(sampled)
        return select_informative_groups(sampled.rewards).tolist()

    def step(self, step: int) -> dict[str, Any]:
        algo = self.recipe.algorithm
        phases = Phases()
        pending = self.ahead.popleft()[1] if self.ahead else self.submit_rollout(step)
        batch, values = self.sample(pending, phases)
        sampled, extra = batch, {}
        if algo.dynamic_sampling:  # refills first: queued behind the rollouts ahead they would wait for them
            batch, sampled, values, refills = self.refill(batch, values, step, phases)
            extra = {"dynamic_sampling/refills": refills,
                     "dynamic_sampling/filler_groups": int((batch.in_loss.sum(1) == 0).sum())}
        self.sample_ahead(step)  # sampled while the learners update on this batch
        with phases("advantages"):
            input_ids, mask, rollout_logp = rollout_tensors(batch.prompts, batch.completions,
                                                            self.tokenizer.pad_token_id)
            mask = mask * batch.in_loss.flatten()[:, None]
            if algo.advantage == "process":  # [P * G, width]: each token its step's and the later steps' rewards
                advantages = process_token_advantages(batch, input_ids.shape[1])
            else:
                valid = ~batch.rewards.isnan()  # [P, G], False where a reward call failed
                advantages = group_advantages(batch.rewards, algo.advantage_scale, valid=valid).flatten()  # [P * G]
            shards = split_shards(input_ids, mask, rollout_logp, advantages, len(self.learners), algo.aggregation,
                                  self.recipe.rollout.max_new_tokens)
        with phases("update"):
            if self.colocated:  # free the shared device for the update (vLLM sleep mode on GPU)
                self.rollout.call("sleep")
            per_rank = self.learners.call_each("update", [(shard,) for shard in shards])
        with phases("sync"):
            if self.colocated:
                self.rollout.call("wake_up")
            self.sync_weights(step + 1)
            if algo.reference_reset_every and (step + 1) % algo.reference_reset_every == 0:
                self.learners.call("reset_reference")
        step_s = sum(phases.seconds.values())
        learner = merge_learner_metrics(per_rank)
        self.last_sampled = sampled
        staleness = [step - c.policy_version for c in batch.completions]  # updates behind the learners' policy
        extra.update({"staleness/mean": sum(staleness) / len(staleness), "staleness/max": max(staleness)})
        return {**learner, **phases.seconds, **extra, **sampling_metrics(sampled, values),
                "completions": len(sampled.completions), "completions_per_s": len(sampled.completions) / step_s,
                "tokens_per_s": sum(len(c.token_ids) for c in sampled.completions) / step_s, "step_s": step_s,
                "faults/engine_restarts": self.rollout.restarts, "faults/reward_restarts": self.reward_restarts}

    def sample_ahead(self, step: int) -> None:
        """Keep the rollouts of steps step+1 .. step+k started (k = max_staleness, within the run's steps): each
        is sampled by the weights the engines hold now, while the learners update; the weight sync after this
        step queues behind them, so the batch of step s + k is k updates stale when trained on."""
        algo = self.recipe.algorithm
        while len(self.ahead) < algo.max_staleness and step + 1 + len(self.ahead) < algo.steps:
            position = self.sampler.position
            self.ahead.append((position, self.submit_rollout(step + 1 + len(self.ahead))))

    def samples_record(self) -> dict[str, Any]:
        """What the last step sampled, for samples.jsonl: per group its prompt (file:line), completions and
        rewards (refills included, in sampling order)."""
        sampled, group = self.last_sampled, self.recipe.algorithm.group_size
        texts = self.tokenizer.batch_decode([c.token_ids for c in sampled.completions], skip_special_tokens=True)
        rewards = sampled.rewards.flatten().tolist()
        return {"groups": [{"prompt": prompt.origin, "completions": texts[i * group:(i + 1) * group],
                            "rewards": rewards[i * group:(i + 1) * group]}
                           for i, prompt in enumerate(sampled.prompts)]}

    def state(self, step: int) -> dict[str, Any]:
        """The driver's part of a checkpoint after `step` steps (JSON). The rollouts sampled ahead, by weights
        up to max_staleness updates old, are collected and kept (with their versions), so a resume trains on them."""
        ahead = [{"sampler_position": position, "version": pending.version,
                  "completions": [dataclasses.asdict(c) for c in self.rollout.collect(pending)]}
                 for position, pending in self.ahead]
        self.rollout.drain()  # behind those on every engine: no further wait
        return {"step": step, "sampler_position": self.sampler.position, "ahead": ahead,
                "missing_rewards": list(self.missing_rewards), "nonfinite": self.control.guard.state(),
                "heldout_before": self.heldout_before, "rng": checkpoint.rng_state(),
                "restarts": {"engine": self.rollout.restarts, "reward": self.reward_restarts}}

    def resume(self, directory: Path) -> int:
        """Load a checkpoint into the learners and the driver and push its weights to the engines; returns
        the step it was taken after."""
        self.learners.call("load_state", str(directory))
        state = json.loads((directory / "driver.json").read_text())
        self.sync_weights(state["step"])
        ahead = state["ahead"] if "ahead" in state else [state["pending"]] if state.get("pending") else []
        for saved in ahead:  # a checkpoint before max_staleness held at most one, as "pending"
            self.sampler.position = saved["sampler_position"]
            prompts = self.sampler.next(self.recipe.algorithm.prompts_per_step)
            version = saved.get("version", state["step"] - 1)  # "pending": sampled one update before
            completions = [Completion(**{"policy_version": version, **c}) for c in saved["completions"]]
            self.ahead.append((saved["sampler_position"],
                               PendingRollout(prompts, [], [], [], version=version, done=completions)))
        self.sampler.position = state["sampler_position"]
        self.missing_rewards.extend(tuple(entry) for entry in state["missing_rewards"])
        self.control.guard.load(state["nonfinite"])
        self.heldout_before = state["heldout_before"]
        self.rollout.restarts, self.reward_restarts = state["restarts"]["engine"], state["restarts"]["reward"]
        checkpoint.set_rng_state(state["rng"])
        return state["step"]

    def save(self, run_dir: Path, step: int) -> Path:
        """An atomic checkpoint after `step` steps: learners' DeepSpeed state and generators plus the driver's."""
        def driver_state(staging: Path) -> None:
            (staging / "driver.json").write_text(json.dumps(self.state(step)))

        return save_checkpoint(self.learners, run_dir, step, self.recipe.output.keep_last, driver_state)

    def write_workers(self, run_dir: Path) -> None:
        """run_dir/workers.json: the process id of every worker by group and rank (for operators and the
        fault-injection script), rewritten after a restart."""
        groups = [self.learners, self.engines, *self.rewards.groups]
        workers = {group.name: group.pids() for group in groups}
        staging = run_dir / ".workers.json.tmp"
        staging.write_text(json.dumps(workers, indent=1))
        staging.replace(run_dir / "workers.json")

    def shutdown(self) -> None:
        """Every worker group built so far, the last built first; one that fails to stop does not keep the
        others running (its error is raised after they are stopped)."""
        errors = []
        for group in reversed(self._groups):
            try:
                group.shutdown()
            except Exception as error:  # noqa: BLE001  raised below
                errors.append(error)
        if errors:
            raise errors[0]


def run_grpo(recipe: GRPORecipe, resume: bool = False) -> dict[str, Any]:
    """`align grpo RECIPE [--resume]`: train, with Ctrl-C/SIGTERM ending in a checkpoint."""
    with grpo_session(recipe, resume) as (run, run_dir, latest), run.control:
        return train(run, run_dir, latest)


@contextmanager
def grpo_session(recipe: GRPORecipe, resume: bool = False) -> Iterator[tuple[GRPORun, Path, Path | None]]:
    """Everything around the training loop: the prompts checked (before anything is written or started), the
    run directory prepared or reopened, the recipe saved, the workers built. Yields (run, run directory, the
    checkpoint to resume from or None); the workers are shut down on exit."""
    prompts = load_prompt_sets(recipe.data, load_tokenizer(recipe.model.tokenizer or recipe.model.path))
    if prompts.skipped:
        print(f"align grpo: skipped {len(prompts.skipped)} bad prompt rows (data.skip_bad_rows); first: "
              f"{prompts.skipped[0]}", file=sys.stderr)
    run_dir = checkpoint.prepare_run_dir(Path(recipe.output.dir), resume, recipe.output.overwrite)
    latest = checkpoint.latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and latest is None:
        print(f"align grpo: --resume: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    run = GRPORun(recipe, prompts)
    try:
        yield run, run_dir, latest
    finally:
        run.shutdown()


def train(run: GRPORun, run_dir: Path, latest: Path | None) -> dict[str, Any]:
    """The training loop from step 0 or from `latest`: steps, logs, checkpoints, held-out accuracy before and
    after, the exported model and the curves; returns the run's summary."""
    recipe, steps = run.recipe, run.recipe.algorithm.steps
    start = run.resume(latest) if latest else 0
    for log_file in ("metrics.jsonl", "samples.jsonl"):
        truncate_metrics(run_dir / log_file, start)
    print(f"align grpo: {len(run.learners)} learner(s), {len(run.engines)} {run.engine_kind} rollout engine(s)"
          + (f", resumed at step {start} from {latest}" if latest else ""))
    run.write_workers(run_dir)
    max_new = recipe.rollout.max_new_tokens
    if not latest:
        run.heldout_before = run.heldout_accuracy(max_new)
    log, samples = MetricsLog(run_dir), JsonlLog(run_dir / "samples.jsonl") if recipe.output.log_samples else None
    saved, restarts = latest, 0
    bar = tqdm(range(start, steps), desc="grpo", unit="step", dynamic_ncols=True, initial=start, total=steps)
    try:
        for step in bar:
            try:
                metrics = run.step(step)
            except WorkerError as err:
                raise WorkerError(f"{err}; the run stopped in step {step + 1}; latest checkpoint: {saved or 'none'}"
                                  + (" (continue with --resume)" if saved else "")) from err
            done = step + 1
            log.log(done, metrics)
            if samples is not None:
                samples.write({"step": done, **run.samples_record()})
            if metrics["faults/engine_restarts"] + metrics["faults/reward_restarts"] != restarts:
                restarts = metrics["faults/engine_restarts"] + metrics["faults/reward_restarts"]
                run.write_workers(run_dir)
            try:
                run.check_reward_failures(metrics)
            except RewardFailure as err:
                saved = run.save(run_dir, done)
                export_model(run.learners, run_dir, "stopped")
                raise RewardFailure(f"{err}; checkpoint: {saved}; policy: {run_dir / 'stopped'}") from err
            every = recipe.output.save_every if done < steps else 1  # always a checkpoint at the end
            saved = run.control.after_step(done, metrics["skipped_updates"], every,
                                           lambda s: run.save(run_dir, s)) or saved
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl', 0):.4f}",
                            c_s=f"{metrics['completions_per_s']:.1f}")
        after = run.heldout_accuracy(max_new)
        run.rollout.drain()  # the last weight push, unchecked when no held-out set was sampled
        final = export_model(run.learners, run_dir)
    finally:
        bar.close()
        log.close()
        if samples is not None:
            samples.close()
    plot = plot_curves(run_dir / "metrics.jsonl", ["reward/mean", "policy_loss", "kl", "completion_length", "entropy",
                                                   "mismatch/logp_abs_mean", "mismatch/kl_k3", "is_truncated",
                                                   "staleness/mean"],
                       run_dir / "curves.png", f"align grpo: {run_dir.name}")
    before = run.heldout_before
    summary = {"engine": run.engine_kind, "heldout_before": before, "heldout_after": after, "plot": str(plot),
               "model": str(final), "checkpoint": str(saved), "run_dir": str(run_dir)}
    if before is not None:
        print(f"align grpo: held-out {recipe.data.heldout_reward} {before:.1%} -> {after:.1%} "
              f"({len(run.heldout)} problems); curves: {plot}")
    print(f"align grpo: done, {steps} steps; model: {final}; checkpoint: {saved}")
    return summary
