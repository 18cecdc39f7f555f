"""Adapters applied to activations instead of weights: no dense ΔW, no second copy of any weight.

`LiveLayer` wraps a Linear or Conv2d of the pipeline and adds low-rank parts on the fly:

    y = s ⊙ (W0·x + Σᵢ upᵢ·(downᵢ·x)) + b,      s = m / ‖V‖ per output row when a part is DoRA (else 1),
    V = W0 + Σᵢ upᵢ·downᵢ,   m = ‖W0 + Σ_LoRA upᵢ·downᵢ‖ + Σ_DoRA (mᵢ − ‖W0‖)

which is exactly `adapters.fuse_weight` of the parts at strength 1. The row norms ‖V‖ need no dense V either:
with U = [up₁ | up₂ | …] [out, R] and D = [down₁; down₂; …] [R, in],

    ‖V_r‖² = ‖W0_r‖² + 2·(U ⊙ (W0·Dᵀ))_r·1 + (U·(D·Dᵀ) ⊙ U)_r·1,

an [out, R] product with the existing weight and an [R, R] Gram matrix. Gradients flow into the parts (a merge's
learned mergers live in them); the base weights are only read, so autograd keeps references, not copies. This is
what lets a ZipQDoRA merge of two SDXL DoRAs run in the memory of a training step (bench/real_scale.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import ZipqError
from .layer import LoraLayer, row_norm


class LiveLayer(torch.nn.Module):
    """A Linear or Conv2d plus `parts` (LoraLayers, scale folded or not) added on the activations."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            raise ZipqError(f"Adapters apply to Linear and Conv2d layers, not {type(base).__name__}.")
        self.base = base
        self.parts: Sequence[LoraLayer] = ()
        with torch.no_grad():
            self.n0 = row_norm(base.weight.float())  # [out], ‖W0‖ per row

    def _down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, torch.nn.Conv2d):
            b = self.base
            return F.conv2d(x, down, None, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, down)

    def _up(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, torch.nn.Conv2d):
            return F.conv2d(h, up.view(up.shape[0], up.shape[1], 1, 1))
        return F.linear(h, up.flatten(1))

    def _row_scale(self) -> torch.Tensor | None:
        """m / ‖V‖ per output row, or None when no part is DoRA."""
        dora = [p for p in self.parts if p.magnitude is not None]
        if not dora:
            return None
        w0 = self.base.weight.detach().flatten(1)  # [out, in]; read, never copied
        lora = [p for p in self.parts if p.magnitude is None]
        magnitude = (self._norm(w0, lora) if lora else self.n0) + sum(p.magnitude.float() - self.n0 for p in dora)
        return magnitude / self._norm(w0, self.parts)

    def _norm(self, w0: torch.Tensor, parts: Sequence[LoraLayer]) -> torch.Tensor:
        up = torch.cat([p.up.float().flatten(1) * p.scale for p in parts], dim=1)  # [out, R]
        down = torch.cat([p.down.float().flatten(1) for p in parts])  # [R, in]
        cross = (down.to(w0.dtype) @ w0.T).float().T  # [out, R]: W0·Dᵀ in the weight's own dtype
        gram = down @ down.T  # [R, R]
        squared = self.n0.square() + 2 * (up * cross).sum(1) + ((up @ gram) * up).sum(1)
        return squared.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parts:
            return self.base(x)
        b, conv = self.base, isinstance(self.base, torch.nn.Conv2d)
        # In the activations' dtype, like the layer itself: autograd then keeps references to x and the weight
        # for the backward pass, not float copies of them. The base is read-only here whatever its flags say: a
        # gradient for it would be a second copy of every weight.
        weight = b.weight.detach()
        if conv:
            out = F.conv2d(x, weight, None, b.stride, b.padding, b.dilation, b.groups)
        else:
            out = F.linear(x, weight)
        for p in self.parts:
            out = out + self._up(self._down(x, p.down.to(x.dtype)), (p.up.float() * p.scale).to(x.dtype))
        scale = self._row_scale()
        if scale is not None:
            out = out * (scale.view(-1, 1, 1) if conv else scale).to(x.dtype)
        if b.bias is not None:
            bias = b.bias.detach()
            out = out + (bias.view(-1, 1, 1) if conv else bias)
        return out


def _parent(root: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


@contextmanager
def live_layers(pipe, keys: Iterable[str]) -> Iterator[dict[str, LiveLayer]]:
    """Swap the pipeline's modules named by `keys` ("unet.…to_q") for `LiveLayer`s; put the originals back on exit.

    Yields:
        {key: LiveLayer}: set `.parts` to choose what each layer adds (empty: the base layer alone).
    """
    from .apply import resolve_module

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    live: dict[str, LiveLayer] = {}
    try:
        for key in sorted(set(keys)):
            module = resolve_module(pipe, key)
            component, _, path = key.partition(".")
            parent, name = _parent(getattr(pipe, component), path)
            layer = LiveLayer(module)
            setattr(parent, name, layer)
            swapped.append((parent, name, module))
            live[key] = layer
        yield live
    finally:
        for parent, name, module in reversed(swapped):
            setattr(parent, name, module)
