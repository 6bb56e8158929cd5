"""The rollout engines as one service for the GRPO driver: split prompts over the engines, collect the
completions in prompt order, push new weights, and survive an engine that dies or hangs.

A dead or hung engine is replaced in its placement bundle, given the weights the others have, and its share
redone with the same arguments. Sampling seeds are fixed per step and engine, so the redone share is the
same sample the lost engine would have returned: a restart loses nothing and changes no result. An engine
that raises (a bug, bad input) is not retried; after `max_restarts` replacements within one call the run
stops with the engine's error.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from align.distributed.worker_group import WorkerError, WorkerGroup
from rollout.torch_engine import Completion, SamplingConfig


@dataclass
class PendingRollout:
    """A started rollout: `refs[e]` samples the prompts at indices `chunks[e]` with `args[e]` on engine e,
    holding the policy `weights` of `version`. `done` holds the completions once collected (kept for a
    checkpoint of a run that samples ahead)."""

    prompts: list[Any]
    chunks: list[list[int]]
    args: list[tuple]
    refs: list[Any]
    weights: Any = None
    version: int = 0
    done: list[Completion] | None = None


class RolloutPool:
    def __init__(self, group: WorkerGroup, max_restarts: int):
        self.group, self.max_restarts = group, max_restarts
        self.weights: Any = None  # object reference of the policy state the engines hold
        self.version = 0  # its policy version (updates applied), stamped on what the engines sample
        self.restarts = 0  # engines replaced over the run

    def __len__(self) -> int:
        return len(self.group)

    def push_weights(self, state_ref: Any, version: int) -> None:
        """Every engine loads the policy state behind `state_ref` (an object-store reference), `version` updates
        old. Queued behind the engines' rollouts already submitted, which sample with the weights before."""
        self.weights, self.version = state_ref, version
        self.call("update_weights", state_ref, version)

    def call(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every engine, replacing engines that die or hang."""
        per_rank = [args] * len(self.group)
        return self._finish(method, per_rank, self.group.submit_each(method, per_rank))

    def submit(self, prompts: list[Any], sampling: SamplingConfig) -> PendingRollout:
        """Start sampling: prompts split evenly over the engines, engine e seeding with `seed + e * 10**12`
        (returns at once)."""
        engines = len(self.group)
        chunks = [list(range(len(prompts)))[i::engines] for i in range(engines)]
        args = [([prompts[i].token_ids for i in chunk], dataclasses.replace(sampling, seed=sampling.seed + e * 10**12))
                for e, chunk in enumerate(chunks)]
        return PendingRollout(prompts, chunks, args, self.group.submit_each("generate", args), self.weights,
                              self.version)

    def collect(self, pending: PendingRollout) -> list[Completion]:
        """Wait for a started rollout; completions come back in prompt order."""
        if pending.done is None:
            results = self._finish("generate", pending.args, pending.refs, (pending.weights, pending.version))
            by_prompt: dict[int, list[Completion]] = {}
            for chunk, result in zip(pending.chunks, results):
                for completion in result:
                    completion.prompt_index = chunk[completion.prompt_index]
                    by_prompt.setdefault(completion.prompt_index, []).append(completion)
            pending.done = [c for index in range(len(pending.prompts)) for c in by_prompt[index]]
        return pending.done

    def generate(self, prompts: list[Any], sampling: SamplingConfig) -> list[Completion]:
        return self.collect(self.submit(prompts, sampling))

    def _finish(self, method: str, per_rank: list[tuple], refs: list[Any], weights: tuple[Any, int] | None = None
                ) -> list[Any]:
        """The calls' results; a dead or hung engine is replaced, loaded with `weights` (the (reference,
        version) the call was made with; default: the current ones) and its call redone."""
        results = self.group.gather(refs, method)
        for rank, result in enumerate(results):
            attempts = 0
            while isinstance(result, WorkerError):
                if not result.hung or attempts == self.max_restarts:
                    raise result
                attempts += 1
                self.restarts += 1
                tqdm.write(f"align grpo: {result}; replacing it (restart {attempts} of {self.max_restarts}) and "
                           f"redoing its {method}", file=sys.stderr)
                result = self._restart_and_redo(rank, method, per_rank[rank],
                                                weights if weights is not None else (self.weights, self.version))
            results[rank] = result
        return results

    def _restart_and_redo(self, rank: int, method: str, args: tuple, weights: tuple[Any, int]) -> Any:
        """A new engine for `rank` redoes `method(*args)` with `weights` (reference, version). A rollout
        sampled ahead was started with older weights: it is redone with those, then the engine gets the current
        ones."""
        try:
            self.group.restart(rank)
            if weights[0] is not None and method != "update_weights":
                self._load(rank, *weights)
            result = self.group.gather([self.group.submit_rank(rank, method, *args)], method)[0]
            if weights[0] is not self.weights and not isinstance(result, WorkerError):
                self._load(rank, self.weights, self.version)
            return result
        except WorkerError as err:
            return err

    def _load(self, rank: int, weights: Any, version: int) -> None:
        self.group.wait([self.group.submit_rank(rank, "update_weights", weights, version)], "update_weights")
