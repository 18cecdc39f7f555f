"""ZipQDoRA Studio core: any subject in any style.

The public API in the order of the flow: load a base model, prepare images, train adapters, merge
them, generate, evaluate. No model is loaded at import time (base models load lazily, cached).
"""

from .errors import ZipqError
from .config import GenerateConfig, TrainConfig
from .base import BaseModel, load_base
from .data import DataConfig, ImageSet, prepare_images
from .adapters import Adapter, LoraLayer, applied, load_adapter, save_adapter
from .train import TrainStep, train_adapter
from .merge import MergeConfig, MergeStep, merge_adapters, slider_adapters
from .generate import generate, load_adapters, parse_adapter_arg
from .evaluate import evaluate_images, load_evaluator

__all__ = [
    "ZipqError",
    "GenerateConfig",
    "TrainConfig",
    "BaseModel",
    "load_base",
    "DataConfig",
    "ImageSet",
    "prepare_images",
    "Adapter",
    "LoraLayer",
    "applied",
    "load_adapter",
    "save_adapter",
    "TrainStep",
    "train_adapter",
    "MergeConfig",
    "MergeStep",
    "merge_adapters",
    "slider_adapters",
    "generate",
    "load_adapters",
    "parse_adapter_arg",
    "evaluate_images",
    "load_evaluator",
]
