"""W&B for a sweep: one run per trial, every run of the sweep kept by one logging process.

Ray's own `WandbLoggerCallback` starts two processes per trial (a queue actor and a logging
actor, each importing Ray and W&B): seconds of CPU per trial, which on a small machine is a
large share of a short trial. Here one Ray actor holds all of a sweep's W&B runs at once (W&B's
`reinit="create_new"`), and the Tune callback sends it each trial's start, results and end
without waiting (one caller, one actor: order is kept), so Tune's loop never blocks on W&B.

The API key never travels as configuration: on a local Ray the actor inherits it from the
environment the driver started Ray with; on a cluster, whose processes do not see the driver's
environment, the driver hands it to the actor in a method call, which sets it in that
process's memory only (no runtime environment record, no file, no experiment state).
Only public Ray APIs are used (`ray.tune.Callback`, `ray.remote`, node affinity).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import ray
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# W&B settings the logging process takes from the driver (never the key: see the docstring).
SETTINGS = ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "WANDB_INIT_TIMEOUT")
# Tune's bookkeeping in each result: not metrics of the run.
TUNE_KEYS = {"config", "trial_id", "experiment_tag", "date", "hostname", "node_ip", "pid", "done"}


class WandbRuns:
    """A Ray actor holding every open W&B run of one sweep, by trial id."""

    def __init__(self, settings: dict[str, str]):
        os.environ.update(settings)
        import wandb

        self._wandb = wandb
        self._runs: dict[str, Any] = {}

    def use_key(self, key: str) -> None:
        """Set the API key in this process's environment only (a cluster's actor lacks it)."""
        os.environ["WANDB_API_KEY"] = key

    def start(self, trial_id: str, init: dict[str, Any]) -> None:
        """Open (or, for a resumed trial, continue) the trial's run."""
        if trial_id not in self._runs:
            self._runs[trial_id] = self._wandb.init(id=trial_id, resume="allow", reinit="create_new", **init)

    def log(self, trial_id: str, metrics: dict[str, Any]) -> None:
        self._runs[trial_id].log(metrics)

    def finish(self, trial_id: str, exit_code: int) -> None:
        run = self._runs.pop(trial_id, None)
        if run is not None:
            run.finish(exit_code=exit_code)

    def close(self) -> None:
        """Finish any open run and shut W&B's service down (no atexit noise when Ray ends us)."""
        for trial_id in list(self._runs):
            self.finish(trial_id, 1)
        self._wandb.teardown()


def metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a Tune result worth a W&B chart: finite numbers, Tune's bookkeeping left out."""
    return {
        key: value
        for key, value in result.items()
        if key not in TUNE_KEYS
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class SweepWandbCallback(tune.Callback):
    """Tune callback: each trial a W&B run (project, group = sweep name, the trial's config),
    logged by one `WandbRuns` actor on the driver's node."""

    def __init__(self, project: str, group: str, entity: Optional[str] = None, cluster: bool = False):
        self.project, self.group, self.entity, self.cluster = project, group, entity, cluster
        self._runs = None

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment
        return {**self.__dict__, "_runs": None}

    def setup(self, **info) -> None:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        settings = {name: os.environ[name] for name in SETTINGS if name in os.environ}
        self._runs = (
            ray.remote(WandbRuns).options(num_cpus=0, max_restarts=0, scheduling_strategy=here).remote(settings)
        )
        key = os.environ.get("WANDB_API_KEY")
        if key and self.cluster:
            self._runs.use_key.remote(key)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        from cmd_ray.grid import grid_point, trial_config

        config = trial_config(trial.config["base"], grid_point(trial.config)).to_used_dict()
        init = {"project": self.project, "group": self.group, "name": str(trial), "config": config}
        if self.entity:
            init["entity"] = self.entity
        self._runs.start.remote(trial.trial_id, init)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._runs.log.remote(trial.trial_id, metrics_of(result))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._runs.finish.remote(trial.trial_id, 0)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._runs.finish.remote(trial.trial_id, 1)

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._runs is not None:
            ray.get(self._runs.close.remote(), timeout=300)
            ray.kill(self._runs)
            self._runs = None
