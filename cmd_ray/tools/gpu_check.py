"""A short accelerator check that needs PyTorch and this package, but no Ray and no network.

    python -m cmd_ray.tools.gpu_check --device cuda --data-root DIR     # or launch/gpu-check.sh
    python -m cmd_ray.tools.gpu_check --device cpu --quick               # the same code path, in CI

1. The in-process trainer on the device, on Fashion-MNIST from `--data-root` (its IDX files
   or the Parquet cache cmd-ray writes there): fp32, then bf16 autocast; on a GPU, the same
   fp32 run on the CPU for the speed ratio. Fails on a non-finite loss or accuracy at chance.
2. The peer step's maths on the device against the CPU, for every formulation: the same
   selection masks and losses within tolerance.
3. The logit exchange between 2 processes sharing the device (as two peers packed on one
   GPU): the backend chosen from their placement must be gloo, and the gathered logits right.
Prints one line per check and the figures (samples/s on the device vs CPU, bf16 vs fp32);
exit status 0 when every check passed, 1 otherwise, 2 when the device is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from cmd_ray import methods
from cmd_ray.config import from_dict
from cmd_ray.datasets import DATA_ROOT
from cmd_ray.exchange import free_port
from cmd_ray.methods import EPOCH_VALUES, StepInputs, StepSchedule
from cmd_ray.metrics import TEST_ACCURACY, peer_key
from cmd_ray.peer import method_plan

CHANCE = 0.1  # Fashion-MNIST has 10 balanced classes
# Settings whose step maths must agree on every device: every registered method at its
# defaults, and each CMD option beyond them.
FORMULATIONS: dict[str, dict[str, Any]] = {
    **{name: {"method": name} for name in methods.NAMES},
    "cmd-p kl small-loss weight 8": {"method": "cmd-p", "distill": {"weight": 8.0}},
    "dividemix mixmatch": {"method": "dividemix", "dividemix": {"warm_up": 0}},
    "cmd-p label correction": {
        "method": "cmd-p",
        "distill": {"loss": "label_correction", "epsilon": "trust"},
        "labels": {"trust": "all"},
    },
    "cmd-s hard agreement": {
        "method": "cmd-s",
        "knowledge": {"certainty": "max_prob"},
        "distill": {"target": "hard"},
        "labels": {"trust": "agreement"},
    },
}


def _run_config(device: str, precision: str, data_root: str, quick: bool) -> dict[str, Any]:
    return {
        "method": "cmd-p",
        "peers": 2,
        "epochs": 2 if quick else 4,
        "batch_size": 128,
        "use_gpu": device == "cuda",
        "precision": precision,
        "output_dir": str(Path(tempfile.gettempdir()) / "cmd-ray-gpu-check"),
        "data": {"root": data_root, "train_subset": 1280 if quick else 6400, "test_subset": 1000},
        "noise": {"type": "symmetric", "rate": 0.4},
        "labels": {"trust": "small_loss"},
        # A check of devices and numerics, not of tuning: a light distillation weight learns
        # within the few steps the check takes.
        "distill": {"weight": 1.0},
    }


def check_training(device: str, precision: str, data_root: str, quick: bool) -> dict[str, Any]:
    """Train 2 peers in-process; (samples/s, final mean accuracy, every loss finite)."""
    from cmd_ray.trainer import train_in_process

    cfg = from_dict(_run_config(device, precision, data_root, quick))
    summary = train_in_process(cfg, log=lambda _: None)
    history = summary["history"]
    steady = history[1:] or history
    losses = [r[peer_key(k, "loss")] for r in history for k in range(cfg.peers)]
    accuracy = history[-1][TEST_ACCURACY]
    return {
        "device": device,
        "precision": precision,
        "steps": len(history) * -(-cfg.data.train_subset // cfg.batch_size),
        "samples_per_second": sum(r["samples_per_second"] for r in steady) / len(steady),
        "accuracy": accuracy,
        "finite": all(math.isfinite(v) for v in losses),
        "ok": all(math.isfinite(v) for v in losses) and accuracy > CHANCE + 0.2,
    }


def check_maths(
    device: str, seed: int = 0, transfer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> dict[str, Any]:
    """Every formulation's loss and selection on `device` against the CPU, on random logits.

    `transfer` moves a CPU tensor to the device (default `tensor.to(device)`); a test passes one
    that also perturbs it, to see the check catch a device that computes differently."""
    move = transfer or (lambda tensor: tensor.to(device))
    g = torch.Generator().manual_seed(seed)
    peer_logits = 3 * torch.randn(2, 256, 10, generator=g)
    labels = torch.randint(0, 10, (256,), generator=g)
    when = StepSchedule(step=30, total_steps=100, steps_per_epoch=10)  # past every ramp's start
    worst, mismatched = 0.0, []
    clean = torch.rand(2, 256, 1, generator=g)  # an epoch hook's values (DivideMix: clean probabilities)

    def inputs(logits: torch.Tensor, values: torch.Tensor) -> StepInputs:
        # The network of a method's second forward pass is the identity: images are the logits.
        ids = torch.arange(logits.shape[0], device=logits.device)
        return StepInputs(ids, logits[:, :, None, None], lambda x: x.flatten(1), seed, {EPOCH_VALUES: values})

    for name, settings in FORMULATIONS.items():
        plan = method_plan(from_dict({**settings, "noise": {"type": "symmetric", "rate": 0.4}}))
        here = plan.loss(0, peer_logits[0], peer_logits, labels, when, inputs(peer_logits[0], clean))
        there_logits = move(peer_logits)
        there_inputs = inputs(there_logits[0], move(clean))
        there = plan.loss(0, there_logits[0], there_logits, move(labels), when, there_inputs)
        difference = abs(float(here.total) - float(there.total))
        worst = max(worst, difference)
        if not torch.equal(here.selected, there.selected.cpu()) or difference > 1e-4:
            mismatched.append(name)
    return {"formulations": len(FORMULATIONS), "max_loss_difference": worst, "mismatched": mismatched}


def _exchange_worker(rank: int, port: int, device: str, out: str) -> None:
    import torch.distributed as dist

    from cmd_ray.exchange import CollectiveExchange, Placement, Topology, gather_placements, make_groups
    from cmd_ray.peer import Batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        here = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
        if here.type == "cuda":
            torch.cuda.set_device(here)
        # Both peers on the same device: what ray.gpus_per_worker 0.5 gives on one GPU.
        placements = gather_placements(Placement("this-node", ("0",) if here.type == "cuda" else ()))
        topology = Topology(peers=2, replicas=1, rank=rank)
        groups = make_groups(topology, placements)
        index = torch.arange(64, device=here)
        batch = Batch(torch.zeros(64, 1, device=here), index, index, index)
        logits = torch.full((64, 10), float(rank + 1), device=here)
        gathered = CollectiveExchange(topology, groups.exchange)([logits], batch)
        result = {
            "backend": dist.get_backend(groups.exchange),
            "right": gathered.device.type == here.type and gathered[:, 0, 0].tolist() == [1.0, 2.0],
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def check_exchange(device: str) -> dict[str, Any]:
    """Two processes on one device exchange logits; the placement must choose gloo."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_exchange_worker, args=(free_port(), device, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    backends = sorted({r["backend"] for r in ranks})
    return {"backends": backends, "ok": backends == ["gloo"] and all(r["right"] for r in ranks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--data-root", default=DATA_ROOT, help="Fashion-MNIST IDX files or cache")
    parser.add_argument("--quick", action="store_true", help="fewer steps (CI on a CPU)")
    parser.add_argument("--output-json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: error: --device: got cuda, but torch sees no CUDA device; allowed here: cpu", file=sys.stderr)
        return 2
    started = time.perf_counter()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"[gpu-check] {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    figures: dict[str, Any] = {"device": name, "torch": torch.__version__}
    runs = [check_training(args.device, "fp32", args.data_root, args.quick)]
    runs.append(check_training(args.device, "bf16", args.data_root, args.quick))
    if args.device == "cuda":
        runs.append(check_training("cpu", "fp32", args.data_root, args.quick))
    for run in runs:
        print(
            f"[gpu-check] train {run['device']} {run['precision']}: {run['steps']} steps, "
            f"{run['samples_per_second']:.0f} samples/s, accuracy {100 * run['accuracy']:.1f}%, "
            f"losses {'finite' if run['finite'] else 'NOT FINITE'} -> {'ok' if run['ok'] else 'FAILED'}"
        )
    figures["training"] = runs
    fp32, bf16 = runs[0]["samples_per_second"], runs[1]["samples_per_second"]
    figures["bf16_over_fp32"] = bf16 / fp32
    line = f"[gpu-check] bf16 / fp32 samples/s on {args.device}: {bf16 / fp32:.2f}"
    if args.device == "cuda":
        figures["device_over_cpu"] = fp32 / runs[2]["samples_per_second"]
        line += f"; {args.device} / CPU (fp32): {figures['device_over_cpu']:.1f}"
    print(line)
    maths = check_maths(args.device)
    figures["maths"] = maths
    print(
        f"[gpu-check] peer-step maths on {args.device} vs CPU: {maths['formulations']} formulations, "
        f"largest loss difference {maths['max_loss_difference']:.2e} -> "
        + (f"FAILED ({', '.join(maths['mismatched'])})" if maths["mismatched"] else "ok")
    )
    exchange = check_exchange(args.device)
    figures["exchange"] = exchange
    print(
        f"[gpu-check] exchange between 2 processes on one {args.device} device: backend "
        f"{'/'.join(exchange['backends'])} -> {'ok' if exchange['ok'] else 'FAILED'}"
    )
    ok = all(r["ok"] for r in runs) and not maths["mismatched"] and exchange["ok"]
    figures["ok"] = ok
    figures["seconds"] = time.perf_counter() - started
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(figures, indent=2))
    print(f"[gpu-check] {'all checks passed' if ok else 'FAILED'} in {figures['seconds']:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
