"""The recipe's rewards in Ray worker groups: every reward scores the batch at the same time, each split
over its own workers, each call bounded by the reward's timeout.

A worker that dies (killed, out of memory) is replaced and its share scored again by the new one, so no
sample is lost. A reward that raises, hangs past its timeout, or returns the wrong count or NaN/inf
costs only the samples of that call: they get no value (the recipe's fallback decides what that means),
the event is counted per reward and described in `errors`, a hung worker is replaced, and the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from align.config.grpo_schema import RewardSpec
from align.distributed.worker_group import BUILD_TIMEOUT_S, WorkerError, WorkerGroup, wait_built
from rewards.base import Sample, Step
from rewards.worker import RewardWorker


@dataclass
class RewardValues:
    values: dict[str, list[float | None]]  # reward name -> one value per sample, None where missing
    failed: dict[str, int] = field(default_factory=dict)  # reward name -> samples without a value
    errors: list[str] = field(default_factory=list)  # one line per failed call, naming reward and cause
    restarts: int = 0  # workers replaced during this batch
    # reward name -> per sample its steps (rewards/base.py), None where it gave none or its call failed
    steps: dict[str, list[list[Step] | None]] = field(default_factory=dict)


class RewardPool:
    def __init__(self, specs: list[RewardSpec], placement: str, env: dict[str, str], wait: bool = True):
        """One worker group per reward, all built at once; with `wait=False` they are still being built when
        this returns (`ready` waits), so that they start beside the learners and engines."""
        self.specs = specs
        self.groups: list[WorkerGroup] = []
        try:
            for index, spec in enumerate(specs):
                group = WorkerGroup(f"reward-{index}-{spec.name.replace(':', '.')}", spec.num_workers,
                                    spec.cpus_per_worker, spec.gpus_per_worker, placement, env, spec.timeout_s)
                self.groups.append(group)
                group.start(RewardWorker, [{"name": spec.name, "args": spec.args}] * spec.num_workers)
            if wait:
                self.ready()
        except BaseException:
            self.shutdown()
            raise

    def ready(self) -> None:
        wait_built(self.groups, at_least_s=BUILD_TIMEOUT_S)

    def score(self, samples: list[Sample]) -> RewardValues:
        started = time.monotonic()
        calls = []
        for spec, group in zip(self.specs, self.groups):
            chunks = [list(range(len(samples)))[rank::len(group)] for rank in range(len(group))]
            refs = group.submit_each("score", [([samples[i] for i in chunk],) for chunk in chunks])
            calls.append((spec, group, chunks, refs))
        result = RewardValues({})
        for spec, group, chunks, refs in calls:
            column: list[float | None] = [None] * len(samples)
            step_column: list[list[Step] | None] = [None] * len(samples)
            remaining = max(0.0, spec.timeout_s - (time.monotonic() - started))
            for rank, (chunk, outcome) in enumerate(zip(chunks, group.gather(refs, "score", remaining))):
                if isinstance(outcome, WorkerError) and outcome.hung and not outcome.timed_out:  # died: redo
                    result.errors.append(f"reward {spec.name!r}: {outcome}; restarted, scoring its share again")
                    group.restart(rank)
                    result.restarts += 1
                    retry = group.submit_rank(rank, "score", [samples[i] for i in chunk])
                    outcome = group.gather([retry], "score (after a restart)", spec.timeout_s)[0]
                if isinstance(outcome, WorkerError):
                    result.errors.append(f"reward {spec.name!r}: {outcome}")
                    if outcome.hung:
                        group.restart(rank)
                        result.restarts += 1
                    continue
                for index, value in zip(chunk, outcome.values):
                    column[index] = value
                for index, steps in zip(chunk, outcome.steps or [None] * len(chunk)):
                    step_column[index] = steps
            result.values[spec.name] = column
            result.steps[spec.name] = step_column
            result.failed[spec.name] = sum(v is None for v in column)
        return result

    def shutdown(self) -> None:
        for group in self.groups:
            group.shutdown()
