"""Ray Tune sweep of CMD runs: the script users hand to `ray submit`.

    ray submit cluster.yaml launch/tune.py -- --config launch/configs/cifar10-paper.yaml
    python launch/tune.py --config launch/configs/fmnist-smoke.yaml          # local embedded Ray
    python launch/tune.py --config launch/configs/fmnist-smoke.yaml --resume # continue a sweep

On a cluster's head node (as `ray submit` runs it) it joins the running cluster; anywhere
else it starts a local embedded Ray. Same as `cmd-ray sweep`.
"""

import sys

from cmd_ray.cli import main
from cmd_ray.commands import head_node_args

if __name__ == "__main__":
    sys.exit(main(["sweep", *head_node_args(sys.argv[1:])]))
