"""ZipQDoRA Studio core: any subject in any style.

The public API in the order of the flow: settings, a base model, images, training, adapters, merging,
generation, evaluation, jobs. Names are imported on first use (a module `__getattr__`), so
`import zipq_core` and `python -m zipq_core --help` load no torch and no model.
"""

from __future__ import annotations

import importlib

# name → module that defines it, in the order of the flow.
_EXPORTS = {
    "ZipqError": "errors",
    "Cancelled": "errors",
    "DataConfig": "config",
    "TrainConfig": "config",
    "MergeConfig": "config",
    "GenerateConfig": "config",
    "Sliders": "config",
    "FAMILY_DEFAULTS": "config",
    "BaseModel": "base",
    "load_base": "base",
    "ImageSet": "data",
    "prepare_images": "data",
    "TrainStep": "progress",
    "train_adapter": "train",
    "Adapter": "adapters",
    "LoraLayer": "adapters",
    "applied": "adapters",
    "load_adapter": "adapters",
    "save_adapter": "adapters",
    "MergeStep": "progress",
    "merge_adapters": "merge",
    "slider_adapters": "merge",
    "generate": "generation",
    "load_adapters": "generation",
    "parse_adapter_arg": "generation",
    "load_images": "evaluate",
    "JobRegistry": "jobs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zipq_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
