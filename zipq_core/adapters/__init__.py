"""Adapters: the layer math and strength semantics (`layer`), fusing into a pipeline (`apply`), the adapter folder
and its one writer (`folder`, with INT8 storage from `int8`), and files of other tools (`kohya`)."""

from .layer import Adapter, LoraLayer, direction_and_magnitude, fuse_weight, row_norm, truncated_svd
from .apply import Phases, applied, applied_phases, resolve_module
from .folder import (
    CHECKPOINT_DIR,
    INT8_DIR,
    INT8_WEIGHTS_NAME,
    PARTS_DIR,
    SIDECAR_NAME,
    TRAIN_IMAGES_DIR,
    WEIGHTS_NAME,
    find_weights_file,
    has_adapter,
    load_adapter,
    load_training_views,
    save_adapter,
    save_training_views,
)
from .imports import MAX_ADAPTER_BYTES, describe_file, import_adapter

__all__ = [
    "Adapter",
    "LoraLayer",
    "direction_and_magnitude",
    "fuse_weight",
    "row_norm",
    "truncated_svd",
    "Phases",
    "applied",
    "applied_phases",
    "resolve_module",
    "CHECKPOINT_DIR",
    "INT8_DIR",
    "INT8_WEIGHTS_NAME",
    "PARTS_DIR",
    "SIDECAR_NAME",
    "TRAIN_IMAGES_DIR",
    "WEIGHTS_NAME",
    "find_weights_file",
    "has_adapter",
    "load_adapter",
    "load_training_views",
    "save_adapter",
    "save_training_views",
    "MAX_ADAPTER_BYTES",
    "describe_file",
    "import_adapter",
]
