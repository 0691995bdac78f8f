"""The GPU check runs on the CPU in CI, so it cannot rot before a GPU is at hand."""

from __future__ import annotations

import json

import pytest

from cmd_ray.tools import gpu_check

from .conftest import needs_fmnist


@needs_fmnist
@pytest.mark.slow
def test_gpu_check_passes_on_the_cpu_with_real_fashion_mnist(real_data_root, tmp_path, capsys):
    out = tmp_path / "figures.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--data-root", str(real_data_root), "--output-json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    figures = json.loads(out.read_text())
    assert figures["ok"] and len(figures["training"]) == 2  # fp32 and bf16; no CPU baseline on the CPU
    assert all(run["finite"] and run["accuracy"] > 0.3 for run in figures["training"])
    assert figures["exchange"]["backends"] == ["gloo"] and not figures["maths"]["mismatched"]
    assert "all checks passed" in printed


def test_gpu_check_refuses_a_missing_gpu_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpu-check: error: --device: got cuda, but torch sees no CUDA device; allowed here: cpu"
    ]


def test_the_maths_check_passes_a_faithful_device_and_names_every_formulation_a_drifting_one_breaks():
    faithful = gpu_check.check_maths("cpu", transfer=lambda t: t.clone())
    assert faithful["formulations"] == len(gpu_check.FORMULATIONS) and not faithful["mismatched"]
    assert faithful["max_loss_difference"] == 0.0
    # A device whose logits come out 1% large (a shift would not do: softmax ignores it): every
    # formulation's loss moves past the 1e-4 tolerance, or its selection changes; the check
    # must say so, by name.
    drifting = gpu_check.check_maths("cpu", transfer=lambda t: t * 1.01 if t.is_floating_point() else t.clone())
    assert drifting["mismatched"] == list(gpu_check.FORMULATIONS), drifting

    # A device that swaps two labels changes the label-dependent losses of every method.
    def swap_labels(t):
        t = t.clone()
        if not t.is_floating_point():
            t[:2] = t[:2].flip(0) + 1
        return t

    assert gpu_check.check_maths("cpu", transfer=swap_labels)["mismatched"]
