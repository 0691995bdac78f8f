"""Tools around cmd-ray, outside its core import path: the benchmarks (`cmd-ray bench ...`) and
the accelerator check (`python -m cmd_ray.tools.gpu_check`). The core modules never import
these (tests/test_layout.py pins it); they import the core."""
