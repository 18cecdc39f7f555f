"""Fusing adapters into a pipeline's weights at their strengths, and restoring them bit for bit."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..config import check_strength
from ..errors import ZipqError
from .layer import Adapter, LoraLayer, fuse_weight


def _group_by_module(adapters: Sequence[tuple[Adapter, float]]) -> dict[str, list[tuple[LoraLayer, float]]]:
    grouped: dict[str, list[tuple[LoraLayer, float]]] = collections.defaultdict(list)
    for adapter, strength in adapters:
        strength = check_strength(strength)
        if strength == 0:
            continue  # strength 0 touches nothing: the base weights stay bit for bit
        for key, layer in adapter.layers.items():
            grouped[key].append((layer, strength))
    return grouped


def resolve_module(pipe, key: str) -> torch.nn.Module:
    """'unet.down_blocks.0…to_q' → the module in the pipeline, with a clear error for foreign adapters."""
    component, _, path = key.partition(".")
    root = getattr(pipe, component, None)
    if root is None:
        raise ZipqError(f"The adapter targets '{component}', which this base model does not have: "
                        "was it trained for another architecture (SD1.5 vs SDXL)?")
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise ZipqError(f"The adapter's layer {key} does not exist in this base model: it was made for "
                        "another model or architecture.") from e


@contextmanager
def applied(pipe, adapters: Sequence[tuple[Adapter, float]]) -> Iterator[int]:
    """Fuse adapters at their strengths into the pipeline's weights, and restore them on exit.

    Fusing costs one weight write per adapted layer and makes generation as fast as the base model;
    the original tensors are kept (not recomputed) so leaving the block restores them bit for bit.

    Yields:
        The number of layers changed.
    """
    with applied_phases(pipe, [adapters]) as phases:
        yield len(phases.keys)


class Phases:
    """Several settings of adapter strengths over one set of layers; `select(i)` fuses setting i in place.

    Only the active setting's weights exist at a time (fused when selected), so a two-phase generation
    needs no more memory than a one-phase one; selecting the active phase again costs nothing. On a GPU the
    original weights wait in host memory, so the device holds one copy of each adapted layer, not two (on the
    CPU, host and device are the same memory).
    """

    def __init__(self, pipe, phases: Sequence[Sequence[tuple[Adapter, float]]]):
        self.groups = [_group_by_module(p) for p in phases]
        self.keys = sorted(set().union(*self.groups))
        self.modules = {k: resolve_module(pipe, k) for k in self.keys}
        self.originals = {k: _to_host(m.weight.data) for k, m in self.modules.items()}
        self.active: int | None = None

    def select(self, index: int) -> None:
        if index == self.active:
            return
        group = self.groups[index]
        previous = None if self.active is None else self.groups[self.active]
        for key in self.keys:
            # A layer whose parts are the same in both settings keeps its fused weight: a per-step schedule that
            # switches a few layers (K-LoRA, merge.klora) re-fuses only those.
            if previous is not None and _same_parts(previous.get(key), group.get(key)):
                continue
            module = self.modules[key]
            weight = self.originals[key].to(module.weight.device)
            module.weight.data = _checked_fuse(key, weight, group[key]) if key in group else weight
        self.active = index

    def restore(self) -> None:
        for key, tensor in self.originals.items():
            self.modules[key].weight.data = tensor.to(self.modules[key].weight.device)
        self.active = None


def _same_parts(a: list[tuple[LoraLayer, float]] | None, b: list[tuple[LoraLayer, float]] | None) -> bool:
    """Whether two settings of one module fuse to the same weight: the same layer objects at the same strengths."""
    a, b = a or [], b or []
    return len(a) == len(b) and all(x is y and s == t for (x, s), (y, t) in zip(a, b))


def _to_host(weight: torch.Tensor) -> torch.Tensor:
    """The weight itself on the CPU; a host copy of a device weight (the device's copy is freed once replaced)."""
    return weight if weight.device.type == "cpu" else weight.to("cpu")


def _checked_fuse(key: str, w0: torch.Tensor, parts: list[tuple[LoraLayer, float]]) -> torch.Tensor:
    fused = fuse_weight(w0, parts)
    if fused.shape != w0.shape:
        raise ZipqError(f"The adapter's layer {key} has shape {tuple(fused.shape)} but the base model's "
                        f"is {tuple(w0.shape)}: it was made for another model.")
    if not torch.isfinite(fused).all():
        raise ZipqError(f"Applying the adapters gave non-finite weights in {key}: lower the strengths.")
    return fused.to(w0.dtype)


@contextmanager
def applied_phases(pipe, phases: Sequence[Sequence[tuple[Adapter, float]]]) -> Iterator[Phases]:
    """Like `applied` for several strength settings of the same adapters; phase 0 is active on entry.

    The caller switches with `phases.select(i)` (generate does so by timestep); on exit the base weights
    are restored bit for bit whatever phase was active.
    """
    state = Phases(pipe, phases)
    try:
        state.select(0)
        yield state
    finally:
        state.restore()


