"""What every trainer does around its learners: start them as a Ray actor group, build one learner per
rank, save atomic checkpoints, resume from the run's latest one and export the model."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from align import checkpoint
from align.config.schema import ClusterConfig
from align.distributed.worker_group import WorkerGroup, start_ray, worker_env
from align.models.export import save_hf_checkpoint


@contextmanager
def learner_group(name: str, cluster: ClusterConfig):
    """`cluster.num_workers` learner actors (Ray started or joined first); shut down on exit."""
    start_ray(cluster.ray_address, cluster.num_workers * cluster.cpus_per_worker,
              cluster.num_workers * cluster.gpus_per_worker)
    group = WorkerGroup(name, cluster.num_workers, cluster.cpus_per_worker, cluster.gpus_per_worker,
                        cluster.placement, worker_env(cluster.threads_per_worker), cluster.call_timeout_s)
    try:
        yield group
    finally:
        group.shutdown()


def construct_learners(group: WorkerGroup, learner: type, recipe: Any, total_steps: int) -> None:
    """One `learner(recipe, rank, world_size, master_addr, master_port, total_steps)` per rank."""
    address, port = group.rendezvous()
    world = len(group)
    group.construct(learner, [
        {"recipe": recipe, "rank": rank, "world_size": world, "master_addr": address, "master_port": port,
         "total_steps": total_steps} for rank in range(world)])


def resume_step(group: WorkerGroup, run_dir: Path, resume: bool) -> int:
    """With `resume`, load the latest checkpoint into every learner and drop metrics logged after it;
    returns the step to continue from (0 for a fresh run)."""
    latest = checkpoint.latest_checkpoint(run_dir / "checkpoints") if resume else None
    if latest is None:
        if resume:
            print(f"align: --resume: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        truncate_metrics(run_dir / "metrics.jsonl", 0)
        return 0
    step = group.call("load_state", str(latest))[0]
    truncate_metrics(run_dir / "metrics.jsonl", step)
    return step


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (a resumed run re-logs the later ones); a last line cut
    short by a kill is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


def save_checkpoint(group: WorkerGroup, run_dir: Path, step: int, keep_last: int,
                    driver_state: Callable[[Path], None] | None = None) -> Path:
    """Every rank (and, with `driver_state`, the driver) writes into one staging directory, which is then
    renamed into place: a kill at any moment leaves the previous checkpoint whole."""
    root = run_dir / "checkpoints"
    name = checkpoint.step_name(step)
    staging = checkpoint.staging_dir(root, name)
    group.call("save_state", str(staging))
    if driver_state is not None:
        driver_state(staging)
    final = checkpoint.commit(staging, root / name)
    checkpoint.prune(root, keep_last)
    return final


def export_model(group: WorkerGroup, run_dir: Path, name: str = "final") -> Path:
    """Rank 0 writes a transformers checkpoint of the model to `run_dir/name` (atomically)."""
    staging = checkpoint.staging_dir(run_dir, name)
    group.call("export_hf", str(staging))
    return checkpoint.commit(staging, run_dir / name)


class StreamedLearnerState:
    """Checkpoint and export methods of a learner with `engine` (DeepSpeed), `stream` (seekable data),
    `step`, `rank`, `recipe` and `tokenizer`."""

    engine: Any
    stream: Any
    step: int
    rank: int
    recipe: Any
    tokenizer: Any

    def save_state(self, directory: str) -> None:
        """Collective: DeepSpeed engine state (weights, optimizer, scheduler), this rank's data position and
        random generators."""
        self.engine.save_checkpoint(directory, tag="engine", client_state={"step": self.step})
        (Path(directory) / f"data_rank{self.rank}.json").write_text(json.dumps(self.stream.position()))
        checkpoint.save_rng(directory, self.rank)

    def load_state(self, directory: str) -> int:
        """Restore engine state and generators, replay the data stream to the saved position; returns the step."""
        _, client_state = self.engine.load_checkpoint(directory, tag="engine")
        self.step = int(client_state["step"])
        self.stream.seek(json.loads((Path(directory) / f"data_rank{self.rank}.json").read_text()))
        checkpoint.load_rng(directory, self.rank)
        return self.step

    def export_hf(self, directory: str) -> None:
        """Collective: rank 0 writes a transformers checkpoint of the trained model."""
        save_hf_checkpoint(self.engine.module, self.recipe.deepspeed.zero_stage, self.rank, self.tokenizer, directory)
