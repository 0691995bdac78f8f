"""Joining or starting Ray, and what it can place: the cluster set-up `cmd-ray train`, the
sweep and the tools share (the driver side only; no worker code).

`init_ray` joins the cluster named by `ray.address` / `$RAY_ADDRESS` or starts a local
embedded Ray that talks only to itself; `check_cluster_resources` refuses a run the cluster
can never place, in one line, before any worker starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

from cmd_ray.config import Config, ConfigError
from cmd_ray.console import console, keep_every_log_line
from cmd_ray.errors import RayStartError
from cmd_ray.exchange import free_port
from cmd_ray.ray_internals import API_SERVER_ADDRESS, prepare_local_ray_environment


def init_ray(cfg: Config, extra_resources: Optional[dict[str, float]] = None, dashboard: bool = True) -> None:
    """Join the cluster named by ray.address / $RAY_ADDRESS, or start a local embedded Ray
    (with `extra_resources`, e.g. the sweep's TRAIN_DRIVER slots; with its dashboard only when
    `dashboard`: see start_local_ray)."""
    import ray

    if ray.is_initialized():
        return
    if cfg.joins_cluster():
        os.environ.pop(API_SERVER_ADDRESS, None)  # a local Ray's, set by start_local_ray, is not this one's
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"], logging_level="WARNING")
        release_orphaned_placement_groups()
        return
    start_local_ray(cfg.ray.num_cpus, extra_resources, dashboard=dashboard)


def release_orphaned_placement_groups(log: Callable[[str], None] = console) -> list[str]:
    """Remove the placement groups that drivers which have died left holding a cluster's resources.

    A Ray Train run reserves its workers' CPUs/GPUs in a placement group, and a helper actor
    removes it if the run's controller dies. When the driver dies while a worker group is being
    started (e.g. a sweep's driver killed mid-sweep), the group is created but not yet handed to
    that helper, and Ray 2.60 keeps it after the job has ended: a `--resume` then waits forever for
    resources nobody uses. Only non-detached groups of jobs that are no longer running are
    removed (a detached group is meant to outlive its job). Returns the ids removed.
    """
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_jobs, list_placement_groups

    try:
        running = {job.job_id for job in list_jobs(limit=10_000) if str(job.status).endswith("RUNNING")}
        held = list_placement_groups(detail=True, limit=10_000, filters=[("state", "!=", "REMOVED")])
    except Exception as err:  # noqa: BLE001 - the State API is an aid here, never a reason to stop
        log(f"[cmd-ray] could not look for placement groups left by dead drivers ({type(err).__name__})")
        return []
    orphans = [g for g in held if not g.is_detached and g.creator_job_id not in running]
    for group in orphans:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group.placement_group_id)))
    if orphans:
        log(
            f"[cmd-ray] removed {len(orphans)} placement group(s) that drivers which died left holding "
            "resources: " + ", ".join(f"{g.placement_group_id} (job {g.creator_job_id})" for g in orphans)
        )
    return [g.placement_group_id for g in orphans]


def start_local_ray(
    num_cpus: Optional[float] = None, resources: Optional[dict[str, float]] = None, dashboard: bool = True
) -> None:
    """A new embedded Ray on this machine that talks only to itself, whatever other local Rays run.

    Ray's own processes that look the cluster up by themselves (Ray Train's placement-group
    cleaner asks the State API) find *every* local Ray on the machine and fail when there are
    two; naming this cluster's dashboard in the environment that Ray's processes inherit keeps
    each one talking to its own. The dashboard is what answers the State API; it is 11 processes
    (the server, a fork server and 9 modules), so a Ray that runs no Ray Train (a sweep whose
    trials hold their peers) starts without it (`dashboard=False`).
    """
    prepare_local_ray_environment()
    keep_every_log_line()
    import ray

    for attempt in (1, 2):  # a loaded machine sometimes misses Ray's start-up deadline once
        port = free_port("127.0.0.1")
        if dashboard:
            os.environ[API_SERVER_ADDRESS] = f"http://127.0.0.1:{port}"
        else:
            os.environ.pop(API_SERVER_ADDRESS, None)  # another Ray's, inherited, is not this one's
        try:
            ray.init(
                # "local": always a new Ray. Without an address Ray joins the newest local cluster it
                # finds (/tmp/ray/ray_current_cluster, written by any other Ray started on this
                # machine) and then refuses the num_cpus and resources given here.
                address="local",
                num_cpus=num_cpus,
                resources=resources,
                logging_level="WARNING",
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
            )
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception when its node times out
            ray.shutdown()
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            if attempt == 2:
                raise RayStartError(f"the local Ray did not start, twice ({reason})") from None
            console(f"[cmd-ray] the local Ray did not start ({reason}); trying once more")


def cpus_per_worker(cfg: Config) -> float:
    """ray.cpus_per_worker, or 1 (an even share of a smaller local Ray's CPUs) when unset."""
    if cfg.ray.cpus_per_worker is not None:
        return cfg.ray.cpus_per_worker
    if cfg.joins_cluster():
        return 1.0
    import ray

    return min(1.0, ray.cluster_resources().get("CPU", 1.0) / cfg.workers)


def worker_resources(cfg: Config) -> dict[str, float]:
    """Per-worker reservation: CPUs always; GPUs (fractions share one GPU) when use_gpu."""
    resources = {"CPU": cpus_per_worker(cfg)}
    if cfg.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return resources


def check_cluster_resources(cfg: Config) -> None:
    """Refuse a run the cluster can never place, before any worker starts."""
    import ray

    total = ray.cluster_resources()
    workers = cfg.workers
    if cfg.use_gpu and total.get("GPU", 0) == 0:
        raise ConfigError("use_gpu: got true, but the Ray cluster has no GPUs; allowed here: false")
    autoscaling = cfg.joins_cluster()
    per_worker = cpus_per_worker(cfg)
    need_cpu = workers * per_worker
    if not autoscaling and need_cpu > total.get("CPU", 0):
        raise ConfigError(
            f"ray.cpus_per_worker: {workers} workers x {per_worker:g} CPUs = {need_cpu:g} CPUs, "
            f"but the local Ray has {total.get('CPU', 0):g}; allowed: at most "
            f"{total.get('CPU', 0) / workers:g} per worker (or raise ray.num_cpus)"
        )
    need_gpu = workers * cfg.ray.gpus_per_worker
    if cfg.use_gpu and not autoscaling and need_gpu > total.get("GPU", 0):
        raise ConfigError(
            f"ray.gpus_per_worker: {workers} workers x {cfg.ray.gpus_per_worker:g} GPUs = {need_gpu:g} GPUs, "
            f"but the local Ray has {total.get('GPU', 0):g}; allowed: at most {total.get('GPU', 0) / workers:g}"
        )
