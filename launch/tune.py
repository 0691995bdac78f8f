"""Ray Tune sweep of CMD runs: the script users hand to `ray submit`.

    ray submit cluster.yaml launch/tune.py -- --config launch/configs/cifar10-paper.yaml
    python launch/tune.py --config launch/configs/fmnist-smoke.yaml          # local embedded Ray
    python launch/tune.py --config launch/configs/fmnist-smoke.yaml --resume # continue a sweep

On a cluster's head node (as `ray submit` runs it) it joins the running cluster; anywhere
else it starts a local embedded Ray. Same as `cmd-ray sweep`.
"""

import os
import sys

from cmd_ray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    # `ray submit` runs this on the head, where a cluster is up: join it rather than start one.
    if "--address" not in args and not os.environ.get("RAY_ADDRESS") and os.path.exists("/tmp/ray/ray_current_cluster"):
        args += ["--address", "auto"]
    sys.exit(main(["sweep", *args]))
