"""What reaches the user's terminal while work runs: progress lines go to stderr, so that stdout
holds only a command's result (the JSON summary of `train` and `prepare`, the tables of `sweep`
and `report`) and can be piped; and Ray is kept from folding concurrent trials' lines.

Torch- and Ray-free: the command line imports it before anything heavy.
"""

from __future__ import annotations

import os
import sys


def console(line: str) -> None:
    """One progress line, from the driver, a Ray worker or a Tune trial. Written to the process's
    real stderr: Ray Train patches print() into its logger (each line would show twice), and Ray
    streams a worker's stderr to the driver's stderr once."""
    sys.__stderr__.write(line + "\n")
    sys.__stderr__.flush()


# Ray colours the "(name pid=N)" prefix of each line its processes print on the driver's console
# unless this is 0 (read at every line): colour codes have no place in a log redirected to a file.
RAY_COLOR_PREFIX = "RAY_COLOR_PREFIX"


def keep_every_log_line() -> None:
    """Ray folds lines of different processes that differ only in numbers into one "[repeated Nx
    across cluster]", which hides concurrent trials' progress lines. Ray reads the switch when it
    is first imported, so this must run before `import ray` (the CLI calls it first thing). And
    when stderr is not a terminal (a log file, a pipe), Ray's lines come without colour codes."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stderr.isatty():
        os.environ.setdefault(RAY_COLOR_PREFIX, "0")
