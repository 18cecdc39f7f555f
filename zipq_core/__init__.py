"""ZipQDoRA Studio core: any subject in any style.

The public API in the order of the flow: load a base model, prepare images, train adapters, merge
them, generate, evaluate. No model is loaded at import time (base models load lazily, cached).
"""

from .errors import ZipqError
from .config import GenerateConfig, TrainConfig
from .base import BaseModel, load_base
from .adapters import Adapter, LoraLayer, applied, load_adapter, save_adapter
from .train import TrainStep, train_adapter
from .generate import generate, load_adapters, parse_adapter_arg

__all__ = [
    "ZipqError",
    "GenerateConfig",
    "TrainConfig",
    "BaseModel",
    "load_base",
    "Adapter",
    "LoraLayer",
    "applied",
    "load_adapter",
    "save_adapter",
    "TrainStep",
    "train_adapter",
    "generate",
    "load_adapters",
    "parse_adapter_arg",
]
