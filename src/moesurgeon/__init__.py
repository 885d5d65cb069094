"""moesurgeon: see how a Mixture-of-Experts model's routers use each expert, and change them.

Public entry points:
- `moesurgeon.arch.get_adapter(model_or_config)`: the per-family adapter (module names, top-k, routing).
- `moesurgeon.probe.RouterUsageProbe`: a context manager that profiles router usage.
- `moesurgeon.io`: checkpoint reader and patch writer (a leaf package: tensors and files only).
- `python -m moesurgeon experiment=NAME`: Hydra-driven experiments (see conf/experiment/).
"""

__version__ = "0.1.0"
