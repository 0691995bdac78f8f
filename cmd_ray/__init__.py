"""cmd-ray: Confident knowledge selection followed by Mutual Distillation (CMD), on Ray.

Modules: config (validated settings), noise (label corruption), data (Parquet-cached data
sets), models (peer networks), knowledge (selection and distillation maths), peer (one
peer's training step), trainer (in-process reference trainer), summary (metrics records).
"""

__version__ = "0.1.0"
