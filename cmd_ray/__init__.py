"""cmd-ray: Confident knowledge selection followed by Mutual Distillation (CMD), on Ray.

The modules, bottom first (every import points down; tests/test_layout.py pins it, and the
README's "Layout" section says what each holds): errors, console, metrics, storage,
ray_internals; datasets/ (one module per built-in data set); catalogue; knowledge (the maths);
methods/ (one module per method); config; noise, user_data; grid, models, data; peer; summary,
exchange; trainer; ray_train (Ray Train); results; wandb_runs, sweep (Ray Tune); tools/
(benchmarks, GPU check); cli.
"""

__version__ = "0.1.0"
