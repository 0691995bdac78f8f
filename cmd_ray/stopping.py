"""How a sweep stops: Ctrl-C (SIGINT) or SIGTERM while its trials run, and the one line it then
prints (which trials finished, where the rows are, the command that resumes it). `run_sweep`
holds `StopSignals` around Tune's loop."""

from __future__ import annotations

import os
from typing import Any, Optional

import pyarrow as pa

from cmd_ray.console import console
from cmd_ray.ray_internals import ask_tune_to_stop, leave_sigint_to_cmd_ray, tune_is_listening
from cmd_ray.results import point_label


def stopped_message(
    signum: Optional[int],
    table: pa.Table,
    counts: dict[str, int],
    trials: int,
    seconds: float,
    path: str,
    resume_command: str,
) -> str:
    """What a stopped sweep tells its user: which trials finished, and the command that resumes it."""
    import signal

    by = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}.get(signum, "its trials stopping")
    finished = sorted({point_label(r) for r in table.to_pylist() if r["status"] == "finished"})
    started = sum(counts.values())
    return (
        f"sweep stopped by {by} after {seconds:.0f} s: {counts['finished']} of {trials} trials finished"
        + (f" ({'; '.join(finished)})" if finished else "")
        + f", {counts['interrupted']} stopped before their last epoch (not recorded as finished), "
        f"{counts['failed']} failed, {trials - started} not started; rows so far in {path}; "
        f"resume with: {resume_command}"
    )


class StopSignals:
    """SIGINT (Ctrl-C) or SIGTERM while a sweep's trials run: the first asks Tune to stop
    gracefully (trials stop; Tune saves the experiment state, so `--resume` continues them from
    their last checkpoints); a second one ends the process at once, with one line and no dump.
    Signal handlers belong to the main thread; elsewhere this does nothing."""

    def __init__(self, resume_command: str):
        self.resume_command = resume_command
        self.signal: Optional[int] = None
        self._saved: dict[int, Any] = {}

    @property
    def exit_status(self) -> int:
        return 128 + (self.signal or 2)

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            leave_sigint_to_cmd_ray()
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signal is None and not tune_is_listening():  # Tune's loop has not begun: nothing to save
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum
            console(
                "[cmd-ray] stopping the sweep: its trials stop, keeping their last checkpoints (again: stop at once)"
            )
            ask_tune_to_stop()
            return
        console(f"cmd-ray: stopped at once; resume with: {self.resume_command}")
        os._exit(self.exit_status)

    def __exit__(self, *exc) -> None:
        import signal

        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
