"""The private Ray names cmd-ray relies on (cmd_ray/ray_internals.py) still exist in this Ray:
a Ray upgrade that moves one fails here instead of silently filling a user's console."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest

from cmd_ray import ray_internals


@pytest.mark.parametrize(
    "module, logger_name",
    [
        (ray_internals.REPORT_LOGGER_MODULE, ray_internals.report_logger_name),
        (ray_internals.CHECKPOINT_LOGGER, lambda: ray_internals.CHECKPOINT_LOGGER),
        (ray_internals.AUTH_TOKEN_LOGGER, lambda: ray_internals.AUTH_TOKEN_LOGGER),
        (ray_internals.TUNE_RUN_LOGGER, lambda: ray_internals.TUNE_RUN_LOGGER),
    ],
)
def test_each_quietened_logger_is_the_one_its_ray_module_logs_with(module, logger_name):
    ray_module = importlib.import_module(module)  # ModuleNotFoundError: the module moved
    assert isinstance(ray_module.logger, logging.Logger)
    assert ray_module.logger.name == logger_name()


def test_the_per_report_logger_gets_the_configured_level():
    ray_internals.quiet_report_logger("ERROR")
    assert importlib.import_module(ray_internals.REPORT_LOGGER_MODULE).logger.level == logging.ERROR


@pytest.mark.parametrize("name", ray_internals.ENVIRONMENT_KNOBS)
def test_each_environment_knob_is_still_read_by_ray_or_tune(name):
    import ray

    root = Path(ray.__file__).parent
    readers = [p for part in ("train", "tune", "air", "_private") for p in (root / part).rglob("*.py")]
    assert any(name in p.read_text(errors="ignore") for p in readers), f"{name} no longer appears in Ray's sources"


def test_tune_still_stops_gracefully_on_sigusr1_when_its_sigint_handler_is_off():
    """cmd-ray asks Tune to stop through SIGUSR1 (ask_tune_to_stop) with Tune's SIGINT handler
    off: both must still be what Tune's signal set-up does."""
    import inspect

    from ray.tune import tune

    source = inspect.getsource(tune._setup_signal_catching)
    assert ray_internals.TUNE_SIGINT_HANDLER in source and "SIGUSR1" in source


def test_ray_still_reads_the_colour_switch_of_its_line_prefixes():
    """cmd-ray turns Ray's colour codes off when stderr is not a terminal (console.RAY_COLOR_PREFIX)."""
    import inspect

    from ray._private import worker

    from cmd_ray.console import RAY_COLOR_PREFIX

    assert f'os.getenv("{RAY_COLOR_PREFIX}") == "0"' in inspect.getsource(worker.print_worker_logs)
