"""A group of Ray actors, each hosting one plain Python object (a learner, an engine, a reward).

The objects know nothing about Ray; the group places them with a placement group, constructs them,
calls their methods on every rank at once, and never waits forever: each call has a timeout and a
failure names the rank and the method.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# The least time a worker's construction is given, whatever its call timeout: a reward's few-second scoring
# timeout bounds a scoring call, not the imports and model load of a (re)start on a loaded machine.
BUILD_TIMEOUT_S = 300.0


class WorkerError(RuntimeError):
    """A remote call failed or timed out; the message names the group, rank and method. `hung`: the worker
    is stuck or dead and must be restarted before it can serve again."""

    def __init__(self, message: str, hung: bool = False, timed_out: bool = False):
        super().__init__(message)
        self.hung, self.timed_out = hung or timed_out, timed_out


class Host:
    """The actor body: holds one object and forwards method calls to it."""

    def __init__(self) -> None:
        self.obj: Any = None
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port (rank 0's serves as the process-group rendezvous)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def construct(self, cls: type, *args: Any, **kwargs: Any) -> None:
        self.obj = cls(*args, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()

    def placement_group_id(self) -> str | None:
        return ray.get_runtime_context().get_placement_group_id()


class WorkerGroup:
    def __init__(self, name: str, num_workers: int, cpus: float, gpus: float, strategy: str,
                 env: dict[str, str], timeout_s: float, reserve_extra: Sequence[dict[str, float]] | None = None,
                 colocate_with: WorkerGroup | None = None):
        """`num_workers` actors of `cpus`/`gpus` each, one per bundle of a new placement group, bundle i also
        holding `reserve_extra[i]` for a group colocated later; or, with `colocate_with`, actor i placed in
        bundle i mod n of that group's placement group (sharing its devices)."""
        self.name, self.timeout_s = name, timeout_s
        self.owns_placement = colocate_with is None
        if colocate_with is not None:
            self.placement, slots = colocate_with.placement, len(colocate_with)
        else:
            extra = reserve_extra or [{}] * num_workers
            bundles = [{k: v for k, v in {"CPU": cpus + e.get("CPU", 0), "GPU": gpus + e.get("GPU", 0)}.items() if v}
                       for e in extra]
            self.placement, slots = placement_group(bundles, strategy=strategy, name=f"align-{name}"), num_workers
            try:
                ray.get(self.placement.ready(), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(self.placement)
                raise WorkerError(f"{name}: Ray could not place {num_workers} workers x {bundles[0]} within "
                                  f"{timeout_s:.0f}s; the cluster has {ray.cluster_resources()}") from None
        self._actor_options = {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env}, "max_restarts": 0}
        self.bundle_indices = [i % slots for i in range(num_workers)]
        self.actors = [self._new_actor(i) for i in self.bundle_indices]

    def _new_actor(self, bundle: int) -> Any:
        return ray.remote(Host).options(
            **self._actor_options,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=bundle),
        ).remote()

    def __len__(self) -> int:
        return len(self.actors)

    def placement_group_ids(self) -> list[str | None]:
        """The placement group each actor actually runs in."""
        return self._get([actor.placement_group_id.remote() for actor in self.actors], "placement_group_id")

    def rendezvous(self) -> tuple[str, int]:
        """Address and port for torch.distributed, taken from rank 0's node."""
        return self._get([self.actors[0].address.remote()], "address")[0]

    def construct(self, cls: type, per_rank_kwargs: Sequence[dict[str, Any]]) -> None:
        """Build `cls(**per_rank_kwargs[rank])` on every rank and wait for all of them."""
        self.start(cls, per_rank_kwargs)
        self.ready()

    def start(self, cls: type, per_rank_kwargs: Sequence[dict[str, Any]]) -> None:
        """Begin building the objects without waiting (`ready` waits), so that several groups build at once."""
        self._made = (cls, list(per_rank_kwargs))
        self._building = [actor.construct.remote(cls, **kwargs) for actor, kwargs in zip(self.actors, per_rank_kwargs)]

    def ready(self) -> None:
        """Wait until the objects `start` began building exist (raises naming the rank that failed)."""
        wait_built([self])

    def restart(self, rank: int) -> None:
        """Replace rank `rank`'s actor (hung or dead) by a new one in the same bundle, built as before."""
        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._new_actor(self.bundle_indices[rank])
        cls, per_rank_kwargs = self._made
        self._get([self.actors[rank].construct.remote(cls, **per_rank_kwargs[rank])], f"{cls.__name__}() restart",
                  timeout_s=max(self.timeout_s, BUILD_TIMEOUT_S))

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every rank in parallel; results in rank order."""
        return self._get(self.submit(method, *args, **kwargs), method)

    def call_each(self, method: str, per_rank_args: Sequence[tuple]) -> list[Any]:
        """Call `method` on every rank with that rank's own arguments (e.g. its shard of a batch)."""
        return self._get(self.submit_each(method, per_rank_args), method)

    def submit_each(self, method: str, per_rank_args: Sequence[tuple]) -> list[ray.ObjectRef]:
        """Start `method` on every rank with that rank's own arguments; wait with `wait`."""
        return [actor.call.remote(method, *args) for actor, args in zip(self.actors, per_rank_args, strict=True)]

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Start `method` on every rank; the references can be passed on to other actors without a copy
        through the driver (Ray resolves a reference given as an argument)."""
        return [actor.call.remote(method, *args, **kwargs) for actor in self.actors]

    def wait(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        return self._get(refs, what)

    def submit_rank(self, rank: int, method: str, *args: Any) -> ray.ObjectRef:
        """Start `method` on one rank (e.g. to redo its share after a restart)."""
        return self.actors[rank].call.remote(method, *args)

    def pids(self) -> list[int | None]:
        """Each rank's process id (None for a worker that is dead; it is replaced when next called)."""
        found = self.gather([actor.pid.remote() for actor in self.actors], "pid", timeout_s=min(self.timeout_s, 60))
        return [None if isinstance(pid, WorkerError) else pid for pid in found]

    def gather(self, refs: list[ray.ObjectRef], what: str, timeout_s: float | None = None) -> list[Any]:
        """Each rank's result, or the `WorkerError` saying why there is none (failed, died, or still running
        after `timeout_s`: that rank is hung, `restart` it). Never raises for a rank's failure."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=limit)
        return [WorkerError(f"{self.name} rank {rank}: {what} did not finish within {limit:.0f}s", timed_out=True)
                if ref in pending else self._outcome(rank, ref, what) for rank, ref in enumerate(refs)]

    def _outcome(self, rank: int, ref: ray.ObjectRef, what: str) -> Any:
        """The finished call's result, or a `WorkerError` naming the rank and the cause."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if getattr(err, "cause", None) is not None else err
            error = WorkerError(f"{self.name} rank {rank}: {what} failed: {type(cause).__name__}: {cause}")
            error.__cause__ = cause
            return error
        except ray.exceptions.RayActorError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return WorkerError(f"{self.name} rank {rank}: worker died during {what} ({reason})", hung=True)

    def _get(self, refs: list[ray.ObjectRef], what: str, timeout_s: float | None = None) -> list[Any]:
        """All ranks' results, raising at the first failure: the other ranks of a collective call would only
        wait for the failed one until the timeout (`timeout_s`, default the group's call timeout)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = [refs.index(ref) for ref in pending]
                raise WorkerError(f"{self.name}: {what} did not finish within {limit:.0f}s on rank(s) {late}",
                                  timed_out=True)
            for ref in ready:
                result = self._outcome(refs.index(ref), ref, what)
                if isinstance(result, WorkerError):
                    raise result
        return ray.get(refs)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.owns_placement:
            remove_placement_group(self.placement)


def wait_built(groups: Sequence[WorkerGroup], at_least_s: float = 0.0) -> None:
    """Wait until every group's `start` has built its objects, raising at the first failure in any group (named,
    with its rank), not after the groups before it have finished building; each group within its own call
    timeout or `at_least_s`, whichever is longer (a reward's timeout bounds a scoring call, not a model load)."""
    started = time.monotonic()
    owner = {ref: (group, rank) for group in groups for rank, ref in enumerate(group._building)}
    limit = {group.name: max(group.timeout_s, at_least_s) for group in groups}
    pending = list(owner)
    while pending:
        deadline = min(started + limit[owner[ref][0].name] for ref in pending)
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            group = min((owner[ref][0] for ref in pending), key=lambda g: limit[g.name])
            late = [rank for ref in pending for g, rank in [owner[ref]] if g is group]
            raise WorkerError(f"{group.name}: {group._made[0].__name__}() did not finish within "
                              f"{limit[group.name]:.0f}s on rank(s) {late}", timed_out=True)
        for ref in ready:
            group, rank = owner[ref]
            result = group._outcome(rank, ref, f"{group._made[0].__name__}()")
            if isinstance(result, WorkerError):
                raise result


def start_ray(address: str | None, num_cpus: float, num_gpus: float) -> None:
    """Join `address` (else the cluster in RAY_ADDRESS, as Ray's own tools and `ray job submit` set it), or start
    a private local Ray with enough logical CPUs for the requested workers."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local": a new local Ray, which Ray would start without the sizing below
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=math.ceil(max(num_cpus, os.cpu_count() or 1)), num_gpus=math.ceil(num_gpus),
             include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)


def worker_env(threads: int) -> dict[str, str]:
    """Environment for every actor: one BLAS/OpenMP thread each (contended vCPUs otherwise stall)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    # CPU kernel limits (rollout/cpu_kernels.py) travel to every worker, also on a cluster started elsewhere.
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE",
                "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env
