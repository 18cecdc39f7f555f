"""Adapters in memory and the strength semantics of DESIGN §6: pure tensor math, no files, no pipelines.

An `Adapter` is a set of low-rank layers keyed by their full module path ("unet.down_blocks.1…to_q").
Every other stage (train, merge, generate, export) speaks this one representation.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ZipqError


@dataclass
class LoraLayer:
    """One adapted layer: ΔW = scale · up @ down, plus DoRA's magnitude when present.

    Shapes: Linear down [r, in], up [out, r]; Conv2d down [r, in, kh, kw], up [out, r, 1, 1];
    magnitude [out] (DoRA's m: the target row norms of the adapted weight).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW in fp32 with the weight's shape ([out, in] or [out, in, kh, kw])."""
        up = self.up.float().flatten(1)  # [out, r]
        down = self.down.float().flatten(1)  # [r, in·kh·kw]
        return (self.scale * up @ down).view(up.shape[0], *self.down.shape[1:])


@dataclass
class Adapter:
    """A trained (or merged) adapter: its layers and what it is."""

    layers: dict[str, LoraLayer]
    use_dora: bool
    info: dict = field(default_factory=dict)  # the sidecar (kind, token, prompts, config, curves…)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.info.get("token") or "adapter")

    @property
    def rank(self) -> int:
        return collections.Counter(layer.rank for layer in self.layers.values()).most_common(1)[0][0]

    def detached(self) -> Adapter:
        """A copy whose tensors carry no autograd history (after a learned merge)."""
        detach = lambda t: None if t is None else t.detach().clone()
        layers = {k: LoraLayer(detach(x.down), detach(x.up), x.scale, detach(x.magnitude))
                  for k, x in self.layers.items()}
        return Adapter(layers=layers, use_dora=self.use_dora, info=dict(self.info))

    def num_params(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() + (0 if layer.magnitude is None else layer.magnitude.numel())
                   for layer in self.layers.values())


# ---------------------------------------------------------------------------------------------------------
# Strength semantics (DESIGN §6)
# ---------------------------------------------------------------------------------------------------------

def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per output row: [out] for [out, in] and conv [out, in, kh, kw] weights (DoRA's norm)."""
    return weight.flatten(1).norm(p=2, dim=1)


def _per_row(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return vector.view(-1, *([1] * (like.dim() - 1)))


def fuse_weight(w0: torch.Tensor, parts: Sequence[tuple[LoraLayer, float]]) -> torch.Tensor:
    """The adapted weight of one layer for adapters at given strengths, in fp32.

    Direction V = W0 + Σ wᵢ·ΔWᵢ. With DoRA parts the rows are rescaled to the magnitude
    m = ‖W0 + Σ_LoRA wᵢ·ΔWᵢ‖ + Σ_DoRA wᵢ·(mᵢ − ‖W0‖): scaling only ΔW would leave m/‖W0‖·W0 at
    strength 0, not W0. So w = 0 gives W0, w = 1 (one adapter) gives exactly m·(W0+ΔW)/‖W0+ΔW‖, peft's DoRA.

    Args:
        w0: the base weight.
        parts: (layer, strength) pairs for this module; strength 0 pairs may be included.

    Returns:
        The fused weight in fp32 (the caller casts it to the module's dtype).
    """
    direction, magnitude = direction_and_magnitude(w0, parts)
    if magnitude is None:
        return direction
    return _per_row(magnitude / row_norm(direction), direction) * direction


def direction_and_magnitude(w0: torch.Tensor, parts: Sequence[tuple[LoraLayer, float]]
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """V = W0 + Σ wᵢ·ΔWᵢ and the DoRA target row norms m (None when no part is DoRA); see `fuse_weight`."""
    w0f = w0.float()
    lora_part = torch.zeros_like(w0f)
    dora_part = torch.zeros_like(w0f)
    magnitude_shift = torch.zeros(w0f.shape[0], dtype=torch.float32, device=w0f.device)
    n0 = row_norm(w0f)
    has_dora = False
    for layer, strength in parts:
        if strength == 0:
            continue
        delta = strength * layer.delta().to(w0f.device)
        if layer.magnitude is None:
            lora_part = lora_part + delta
        else:
            has_dora = True
            dora_part = dora_part + delta
            magnitude_shift = magnitude_shift + strength * (layer.magnitude.float().to(w0f.device).flatten() - n0)
    direction = w0f + lora_part + dora_part
    if not has_dora:
        return direction, None
    return direction, row_norm(w0f + lora_part) + magnitude_shift




def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[LoraLayer, float]:
    """The best rank-r factorisation of a dense ΔW ([out, in] or conv [out, in, kh, kw]) and its relative error.

    The singular values are split evenly between the factors (up = U·√S, down = √S·Vᵀ), so neither factor is
    ill-scaled in fp16. The error is ‖ΔW − up·down‖_F / ‖ΔW‖_F (0 for an exact factorisation).
    """
    flat = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = (u[:, :r] * root).view(delta.shape[0], r, *([1] * (delta.dim() - 2)))
    down = (vh[:r] * root[:, None]).reshape(r, *delta.shape[1:])
    error = float((s[r:].square().sum() / s.square().sum().clamp_min(1e-30)).sqrt())
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ZipqError("An SVD gave non-finite factors: the adapter holds non-finite or huge values.")
    return LoraLayer(down=down, up=up, scale=1.0), error
