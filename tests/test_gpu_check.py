"""The GPU check runs on the CPU in CI, so it cannot rot before a GPU is at hand."""

from __future__ import annotations

import json

import pytest

from cmd_ray import gpu_check

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


def test_every_formulation_agrees_with_itself_on_the_cpu():
    maths = gpu_check.check_maths("cpu")
    assert maths["formulations"] == len(gpu_check.FORMULATIONS) and not maths["mismatched"]
