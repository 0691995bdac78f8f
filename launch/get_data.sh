#!/usr/bin/env bash
# Make Fashion-MNIST available: Debian's dataset-fashion-mnist where apt works, else
# torchvision downloads it into the cmd-ray data cache on first use.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  echo "[data] Fashion-MNIST found in $dir"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  echo "[data] installing Debian's dataset-fashion-mnist ..."
  if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    exit 0
  fi
  echo "[data] apt install failed; torchvision will download Fashion-MNIST on first use"
else
  echo "[data] no apt-get here; torchvision will download Fashion-MNIST on first use"
fi
