"""The rollout engines as one service for the GRPO driver: split prompts over the engines, collect the
completions in prompt order, push new weights, and survive an engine that dies or hangs.

A dead or hung engine is replaced in its placement bundle, given the weights the others have, and its share
redone with the same arguments. Sampling seeds are fixed per step and engine, so the redone share is the
same sample the lost engine would have returned: a restart loses nothing and changes no result. An engine
that raises (a bug, bad input) is not retried; after `max_restarts` replacements within one call the run
stops with the engine's error.

Weight pushes do not wait: an engine runs its calls in order, so a push queues behind the rollouts already
submitted (sampled ahead, with the older weights) and before any submitted after it. A push is checked before
the first rollout submitted after it is collected (it is ahead of that rollout on the engine, so this costs
no wait), and released as soon as it is found finished. Each call remembers which incarnation of its engine
it went to (`epochs`): a call lost with an engine that has already been replaced is redone on the replacement
without replacing it again.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm import tqdm

from align.distributed.worker_group import WorkerError, WorkerGroup
from rollout.torch_engine import Completion, SamplingConfig


@dataclass
class PendingRollout:
    """A started rollout: `refs[e]` samples the prompts at indices `chunks[e]` with `args[e]` on engine e (its
    incarnation `epochs[e]`), holding the policy `weights` of `version`, after `pushes` weight pushes. `done`
    holds the completions once collected (kept for a checkpoint of a run that samples ahead); `weights` is then
    dropped, so a finished rollout pins no copy of an old policy in the object store."""

    prompts: list[Any]
    chunks: list[list[int]]
    args: list[tuple]
    refs: list[Any]
    weights: Any = None
    version: int = 0
    done: list[Completion] | None = None
    epochs: list[int] = field(default_factory=list)
    pushes: int = 0


@dataclass
class WeightPush:
    """`update_weights(weights, version)` submitted to every engine (`refs`, to incarnations `epochs`)."""

    number: int
    refs: list[Any]
    epochs: list[int]


class RolloutPool:
    def __init__(self, group: WorkerGroup, max_restarts: int):
        self.group, self.max_restarts = group, max_restarts
        self.weights: Any = None  # object reference of the policy state the engines hold
        self.version = 0  # its policy version (updates applied), stamped on what the engines sample
        self.restarts = 0  # engines replaced over the run
        self.epochs = [0] * len(group)  # incarnation of each rank's engine (+1 per replacement)
        self.pushes: list[WeightPush] = []  # submitted, not yet found finished
        self.pushed = 0  # weight pushes so far
        self.in_flight: list[PendingRollout] = []  # submitted, not yet collected

    def __len__(self) -> int:
        return len(self.group)

    def push_weights(self, state_ref: Any, version: int) -> None:
        """Every engine loads the policy state behind `state_ref` (an object-store reference), `version` updates
        old; returns at once (module docstring). Rollouts and pushes already finished are released first."""
        self._release_finished()
        self.weights, self.version = state_ref, version
        self.pushed += 1
        args = [(state_ref, version)] * len(self.group)
        self.pushes.append(WeightPush(self.pushed, self.group.submit_each("update_weights", args), list(self.epochs)))

    def call(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every engine, replacing engines that die or hang (after the pending pushes)."""
        self.drain()
        per_rank = [args] * len(self.group)
        epochs = list(self.epochs)
        return self._finish(method, per_rank, self.group.submit_each(method, per_rank), epochs)

    def submit(self, prompts: list[Any], sampling: SamplingConfig) -> PendingRollout:
        """Start sampling: prompts split evenly over the engines, engine e seeding with `seed + e * 10**12`
        (returns at once)."""
        engines = len(self.group)
        chunks = [list(range(len(prompts)))[i::engines] for i in range(engines)]
        args = [([prompts[i].token_ids for i in chunk], dataclasses.replace(sampling, seed=sampling.seed + e * 10**12))
                for e, chunk in enumerate(chunks)]
        pending = PendingRollout(prompts, chunks, args, self.group.submit_each("generate", args), self.weights,
                                 self.version, epochs=list(self.epochs), pushes=self.pushed)
        self.in_flight.append(pending)
        return pending

    def collect(self, pending: PendingRollout) -> list[Completion]:
        """Wait for a started rollout; completions come back in prompt order."""
        if pending.done is None:
            self._check_pushes(pending.pushes)
            results = self._finish("generate", pending.args, pending.refs, pending.epochs,
                                   (pending.weights, pending.version))
            by_prompt: dict[int, list[Completion]] = {}
            for chunk, result in zip(pending.chunks, results):
                for completion in result:
                    completion.prompt_index = chunk[completion.prompt_index]
                    by_prompt.setdefault(completion.prompt_index, []).append(completion)
            pending.done = [c for index in range(len(pending.prompts)) for c in by_prompt[index]]
            pending.weights, pending.refs = None, []
            self.in_flight = [p for p in self.in_flight if p is not pending]
        return pending.done

    def generate(self, prompts: list[Any], sampling: SamplingConfig) -> list[Completion]:
        return self.collect(self.submit(prompts, sampling))

    def drain(self) -> None:
        """Wait for every weight push (raising if an engine refused one): at the end of a run, or once the
        rollouts ahead are collected for a checkpoint (then without waiting longer)."""
        self._check_pushes(self.pushed)

    def _check_pushes(self, upto: int) -> None:
        """Wait for the weight pushes numbered <= `upto` (raising if an engine refused one)."""
        while self.pushes and self.pushes[0].number <= upto:
            push = self.pushes.pop(0)
            per_rank = [("pushed weights",)] * len(self.group)  # never resubmitted: see `_redo`
            self._finish("update_weights", per_rank, push.refs, push.epochs)

    def _release_finished(self) -> None:
        """Check the pushes and collect the rollouts whose engines have all finished, without waiting, so their
        references (and the old weights a rollout holds for a redo) are released."""
        refs = [ref for push in self.pushes for ref in push.refs] + [ref for p in self.in_flight for ref in p.refs]
        if not refs:
            return
        # fetch_local=False: a result still on another node's object store counts as finished
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
        while self.pushes and all(ref in ready for ref in self.pushes[0].refs):
            self._check_pushes(self.pushes[0].number)
        for pending in [p for p in self.in_flight if all(ref in ready for ref in p.refs)]:
            if pending.pushes <= (self.pushes[0].number - 1 if self.pushes else self.pushed):
                self.collect(pending)

    def _finish(self, method: str, per_rank: list[tuple], refs: list[Any], epochs: list[int],
                weights: tuple[Any, int] | None = None) -> list[Any]:
        """The calls' results; a dead or hung engine is replaced (once per incarnation), loaded with `weights`
        (the (reference, version) the call was made with; default: the current ones) and its call redone."""
        results = self.group.gather(refs, method)
        epochs = list(epochs)
        for rank, result in enumerate(results):
            attempts = 0  # replacements made for this call (a redo on an existing replacement is not one)
            while isinstance(result, WorkerError):
                replace = epochs[rank] == self.epochs[rank]
                if not result.hung or (replace and attempts == self.max_restarts):
                    raise result
                attempts += replace
                result = self._redo(rank, method, per_rank[rank], replace, result, attempts,
                                    weights if weights is not None else (self.weights, self.version))
                epochs[rank] = self.epochs[rank]
            results[rank] = result
        return results

    def _redo(self, rank: int, method: str, args: tuple, replace: bool, error: WorkerError, attempt: int,
              weights: tuple[Any, int]) -> Any:
        """Redo `method(*args)` on rank `rank` with `weights` (reference, version), replacing its engine first if
        the call went to the current incarnation (`replace`). A rollout sampled ahead was started with older
        weights: it is redone with those, then the engine gets the current ones. A weight push is not redone: a
        replacement always ends holding the current weights, which are never older than the push's. (A redo on
        an existing replacement waits behind what is queued on it within one call timeout; past it, that
        replacement is taken for hung and replaced too: correct, but a restart more.)"""
        try:
            if replace:
                self.restarts += 1
                tqdm.write(f"align grpo: {error}; replacing it (restart {attempt} of {self.max_restarts}) and "
                           f"redoing its {method}", file=sys.stderr)
                self.group.restart(rank)
                self.epochs[rank] += 1
                if method == "update_weights":
                    self._load(rank, self.weights, self.version)
            if method == "update_weights":
                return None
            if weights[0] is not None:
                self._load(rank, *weights)
            result = self.group.gather([self.group.submit_rank(rank, method, *args)], method)[0]
            if weights[0] is not self.weights and not isinstance(result, WorkerError):
                self._load(rank, self.weights, self.version)
            return result
        except WorkerError as err:
            return err

    def _load(self, rank: int, weights: Any, version: int) -> None:
        self.group.wait([self.group.submit_rank(rank, "update_weights", weights, version)], "update_weights")
