"""One CMD training on Ray Train: `python launch/train.py --config launch/configs/fmnist.yaml [--set k=v ...]`.

Same as `cmd-ray train`; runs on a local embedded Ray unless --address (or $RAY_ADDRESS) names a cluster.
"""

import sys

from cmd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
