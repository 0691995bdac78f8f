"""Everything cmd-ray takes from Ray that Ray does not promise to keep, in one place.

Ray's public APIs carry the work (Train, Tune, the State API); what is here only keeps a run's
console quiet or a local Ray responsive: loggers that Ray Train's LoggingConfig does not reach,
named after private modules, and environment knobs that Ray's internals read. Every name is
pinned by tests/test_ray_internals.py, which fails on the Ray upgrade that moves one: the upgrade
then breaks a test here, not silently a user's console.
"""

from __future__ import annotations

import importlib
import logging
import os

# Ray Train V2 logs "Reporting training result N: TrainingReport(...)" at INFO per report, with a
# logger named after this module's *file path*, outside the `ray.train` hierarchy.
REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"
# One INFO line per checkpoint saved through Ray Train's storage helpers (a sweep's console).
CHECKPOINT_LOGGER = "ray.train._internal.storage"
# Ray >= 2.60 turns token authentication on for a new local cluster (kept: the secure default)
# and says so in a WARNING at every start; the notice asks nothing of a user.
AUTH_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"

# Tune's run loop logs its own stop notices ("Stop signal received ...", "Trials did not complete",
# and a resume hint naming Tuner.restore) with this module's logger; cmd-ray says what stopped
# and how to resume in its own words.
TUNE_RUN_LOGGER = "ray.tune.tune"

# Environment knobs Ray's internals read (not documented settings): name -> what cmd-ray sets.
# A local embedded Ray has no preemptible nodes: skip Ray Train's preemption watcher, whose actor
# logs a restart warning at every start.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray Train's controller looks at its workers every 2 s by default: a run's end (and each epoch's
# report) reaches the driver up to 2 s late; a local run can afford a closer look.
HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# The dashboard Ray's own processes ask (the State API); set per local Ray (see start_local_ray).
API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
# Tune's older console engine prints nothing at verbose=0 (the newer one prints an experiment box
# and a TensorBoard hint whatever the verbosity); cmd-ray prints its own lines.
AIR_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"

# Tune catches the first SIGINT itself; with this set it leaves SIGINT to cmd-ray, which asks Tune
# for the same graceful stop through SIGUSR1 (the signal Tune always listens to) and owns the second.
TUNE_SIGINT_HANDLER = "TUNE_DISABLE_SIGINT_HANDLER"

ENVIRONMENT_KNOBS = (PREEMPTION_WATCHER, HEALTH_CHECK_INTERVAL, API_SERVER_ADDRESS, AIR_NEW_OUTPUT, TUNE_SIGINT_HANDLER)


def report_logger_name() -> str:
    """The name of the logger behind Ray Train's per-report INFO line."""
    return importlib.import_module(REPORT_LOGGER_MODULE).__file__


def quiet_report_logger(level: str) -> None:
    """Give Ray Train's per-report logger the run's `ray.log_level` (LoggingConfig does not)."""
    logging.getLogger(report_logger_name()).setLevel(level)


def quiet_checkpoint_logger() -> None:
    """Drop Ray's INFO line per saved checkpoint."""
    logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.WARNING)


def prepare_local_ray_environment() -> None:
    """Before a local embedded Ray starts: no preemption watcher, a closer health check, and no
    token-authentication notice (authentication itself stays on)."""
    os.environ.setdefault(PREEMPTION_WATCHER, "0")
    os.environ.setdefault(HEALTH_CHECK_INTERVAL, "0.5")
    logging.getLogger(AUTH_TOKEN_LOGGER).setLevel(logging.ERROR)


def prefer_quiet_tune_console() -> None:
    """Before Tune is imported: its older console engine (silent at verbose=0)."""
    os.environ.setdefault(AIR_NEW_OUTPUT, "0")


def leave_sigint_to_cmd_ray() -> None:
    """Before a sweep's fit: Tune installs no SIGINT handler (cmd-ray's own stays), and its run
    loop's stop notices stay off the console."""
    os.environ[TUNE_SIGINT_HANDLER] = "1"
    logging.getLogger(TUNE_RUN_LOGGER).setLevel(logging.CRITICAL)


def ask_tune_to_stop() -> None:
    """Tune's graceful stop (save the experiment state, stop the trials), as its SIGINT handler
    would start it: Tune listens to SIGUSR1 for that whatever TUNE_DISABLE_SIGINT_HANDLER says."""
    import signal

    os.kill(os.getpid(), signal.SIGUSR1)


def tune_is_listening() -> bool:
    """Whether a handler (Tune's, once its run loop has begun) waits for SIGUSR1; without one,
    SIGUSR1 would end the process."""
    import signal

    return signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
