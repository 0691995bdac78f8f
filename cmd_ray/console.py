"""What reaches the user's terminal while work runs: progress lines go to stderr, so that stdout
holds only a command's result (the JSON summary of `train` and `prepare`, the tables of `sweep`
and `report`) and can be piped; Ray is kept from folding concurrent trials' lines; and the blocks Ray's own
processes print that Ray itself calls harmless stay in Ray's logs, off the console.

Torch- and Ray-free: the command line imports it before anything heavy.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
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


# --------------------------------------------------------------------------------------
# Ray's own harmless noise, kept off the console

# How Ray prefixes a line one of its processes printed, on the driver's console:
# "(RayTrainWorker pid=123) text" or "(run_trial pid=9, ip=10.0.0.2) text", maybe coloured.
RAY_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?P<process>[^()]*pid=\d+[^()]*)\)(?:\x1b\[[0-9;]*m)* ?(?P<text>.*)$")
# A block of lines one process prints that may be Ray's noise, decided when the block ends.
TRACEBACK = "Traceback (most recent call last):"
BLOCK_START = re.compile(
    r"^(Exception ignored in|Traceback \(most recent call last\):|Failed to send resource request)"
)
BLOCK_GOES_ON = re.compile(r"^(\s|Traceback \(most recent call last\):|During handling of|The above exception|$)")
# Ray's noise, each a block Ray's own code prints and calls (or makes) harmless:
HARMLESS = (
    # Ray ends a finished trial's (or helper actor's) process with SIGTERM; its handler raises
    # SystemExit while the process is already finalising, and Python prints it as "ignored".
    re.compile(r"in sigterm_handler.*\nSystemExit: 1", re.S),
    # Ray Train's controller, when a resource request times out on a loaded machine: "If this only
    # happens transiently during network partition or CPU being overloaded, it's safe to ignore".
    re.compile(r"it's safe to ignore this error.*GetTimeoutError", re.S),
)


class RayNoiseFilter(io.TextIOBase):
    """The driver's stderr as Ray's processes reach it: every line passes, except blocks that
    Ray prints and itself calls harmless (HARMLESS: a SIGTERM raced at a process's exit, a
    resource request that timed out on a loaded machine), which stay in Ray's own log files
    (its session folder's logs/) and off the console. Lines of each process are grouped by
    Ray's "(name pid=N)" prefix; a block is decided when it ends, so nothing else is held back."""

    def __init__(self, stream):
        self.stream = stream
        self._partial = ""
        self._blocks: dict[str, list[str]] = {}
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def _line(self, line: str) -> None:
        match = RAY_LINE.match(line)
        if match is None:
            self.stream.write(line + "\n")
            return
        process, text = match["process"], match["text"]
        block = self._blocks.get(process)
        if block is None:
            if BLOCK_START.match(text):
                self._blocks[process] = [line]
            else:
                self.stream.write(line + "\n")
            return
        if BLOCK_GOES_ON.match(text) and len(block) < 500:
            block.append(line)
            return
        if any(TRACEBACK in b for b in block):  # the exception's own line ends a traceback
            block.append(line)
            self._decide(process)
            return
        self._decide(process)  # a start that no traceback followed: decided as it is
        self._line(line)

    def _decide(self, process: str) -> None:
        block = self._blocks.pop(process)
        text = "\n".join(m["text"] if (m := RAY_LINE.match(b)) else b for b in block)
        if any(pattern.search(text) for pattern in HARMLESS):
            self.dropped += 1
        else:
            self.stream.write("\n".join(block) + "\n")

    def close_blocks(self) -> None:
        """Show every block still open (nothing is ever lost for want of an ending)."""
        for process in list(self._blocks):
            self.stream.write("\n".join(self._blocks.pop(process)) + "\n")
        if self._partial:
            self.stream.write(self._partial)
            self._partial = ""
        self.stream.flush()


@contextlib.contextmanager
def ray_noise_kept_off_the_console():
    """While a command runs: the driver's stderr through a RayNoiseFilter (Ray's log listener
    prints its processes' lines to whatever sys.stderr is then); restored afterwards."""
    original = sys.stderr
    sys.stderr = RayNoiseFilter(original)
    try:
        yield sys.stderr
    finally:
        sys.stderr.close_blocks()
        sys.stderr = original
