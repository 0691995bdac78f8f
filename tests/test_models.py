"""Peer architectures: output shapes, per-peer choice, refusals."""

from __future__ import annotations

import pytest
import torch

from cmd_ray.models import PreActResNet18, SmallCNN, build_model


def test_small_cnn_shapes():
    assert SmallCNN(10, 1)(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_preact_resnet18_shapes_and_size():
    model = PreActResNet18(100, 3)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert 11e6 < sum(p.numel() for p in model.parameters()) < 11.5e6


def test_build_model_refuses_architecture_that_does_not_fit_the_images():
    with pytest.raises(ValueError, match=r"^model\.name: 'preact_resnet18' takes 32x32 images"):
        build_model("preact_resnet18", 10, 1, 28)
    with pytest.raises(ValueError, match=r"^model\.name: got 'vgg'"):
        build_model("vgg", 10, 1, 28)
