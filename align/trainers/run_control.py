"""What ends a run early, the same way for every trainer: a stop signal from the user or the scheduler
(Ctrl-C, SIGTERM on pre-emption) and updates that keep coming out non-finite."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from tqdm import tqdm


class RunInterrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteUpdates(RuntimeError):
    """Too many optimizer steps in a row were skipped because the loss or a gradient was NaN/inf."""


class StopRequest:
    """Within `with StopRequest() as stop:` the first SIGINT or SIGTERM only sets `stop.signum`: the driver
    finishes the step it is in, saves a checkpoint and raises `RunInterrupted`. A second signal interrupts
    at once (KeyboardInterrupt), without a checkpoint. Ray's workers run in their own process groups, so a
    terminal's Ctrl-C reaches the driver only and the learners stay up to write the checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, command: str):
        self.command = command
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{self.command}: {signal.Signals(signum).name}: stopping after this step and saving a "
                   "checkpoint (send it again to stop at once, without one)")

    def interrupted(self, step: int, saved: Any) -> RunInterrupted:
        assert self.signum is not None
        return RunInterrupted(f"stopped on {signal.Signals(self.signum).name} after step {step}; checkpoint: {saved}; "
                              "run the same command with --resume to continue", self.signum)


class NonFiniteGuard:
    """Counts optimizer steps DeepSpeed skipped because the loss or a gradient was not finite (the weights,
    optimizer state and lr schedule stay as they were) and stops the run after `max_in_row` in a row."""

    def __init__(self, command: str, max_in_row: int):
        self.command, self.max_in_row = command, max_in_row
        self.in_row = self.total = 0

    def check(self, step: int, skipped: float) -> None:
        """`skipped`: optimizer steps skipped during `step` (the learners' `skipped_updates`)."""
        if not skipped:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += int(skipped)
        tqdm.write(f"{self.command}: step {step}: non-finite loss or gradient, update skipped "
                   f"({self.in_row} in a row, {self.total} in this run)")
        if self.in_row >= self.max_in_row:
            raise NonFiniteUpdates(
                f"{self.in_row} steps in a row had a non-finite loss or gradient (train.max_nonfinite_in_row "
                f"{self.max_in_row}); the weights are those of the last update applied; lower train.lr or check "
                "the data")

    def state(self) -> dict[str, int]:
        return {"in_row": self.in_row, "total": self.total}

    def load(self, state: dict[str, int]) -> None:
        self.in_row, self.total = state["in_row"], state["total"]


class RunControl:
    """The signal handler and the non-finite guard together, as a trainer's loop uses them:

        with RunControl("align sft", max_in_row) as control:
            for each step: ...; control.after_step(step, skipped, save_every, save)
    """

    def __init__(self, command: str, max_nonfinite_in_row: int):
        self.stop = StopRequest(command)
        self.guard = NonFiniteGuard(command, max_nonfinite_in_row)

    def __enter__(self) -> RunControl:
        self.stop.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.__exit__(*exc)

    def after_step(self, step: int, skipped: float, save_every: int, save: Callable[[int], Any]) -> Any:
        """The end of every step: `save(step)` a checkpoint when `step` is a multiple of `save_every` or the
        run must stop (a signal came, or too many non-finite updates in a row), then stop it: raise
        `RunInterrupted` or `NonFiniteUpdates` naming the checkpoint. Returns what `save` returned, or None."""
        try:
            self.guard.check(step, skipped)
            failure = None
        except NonFiniteUpdates as err:
            failure = err
        ending = failure is not None or self.stop.signum is not None
        saved = save(step) if (save_every and step % save_every == 0) or ending else None
        if failure is not None:
            raise NonFiniteUpdates(f"{failure}; checkpoint: {saved}")
        if ending:
            raise self.stop.interrupted(step, saved)
        return saved
