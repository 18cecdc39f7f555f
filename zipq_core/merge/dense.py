"""TIES and DARE: merges that work on each layer's dense ΔW, then re-compress each part to its rank by SVD."""

from __future__ import annotations

import torch

from ..adapters import Adapter, resolve_module, row_norm, truncated_svd
from ..config import MergeConfig


def dense_parts(pipe, subject: Adapter, style: Adapter, cfg: MergeConfig) -> tuple[Adapter, Adapter, float]:
    """TIES (trim, elect sign, disjoint merge) or DARE (drop and rescale) on the dense ΔW, each part then
    re-compressed to its own rank by SVD (the lossy step, whose worst relative error is returned)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    parts = ({}, {})
    worst = 0.0
    for key in sorted(set(subject.layers) | set(style.layers)):
        w0 = resolve_module(pipe, key).weight.data.float().cpu()
        n0 = row_norm(w0)
        sources = [(i, a.layers[key], w) for i, (a, w) in
                   enumerate(((subject, cfg.subject_weight), (style, cfg.style_weight))) if key in a.layers]
        deltas = [w * layer.delta() for _, layer, w in sources]
        if cfg.method == "ties":
            deltas = _ties(deltas, cfg.density)
        else:
            deltas = [_dare(d, cfg.density, generator) for d in deltas]
        for (i, layer, w), delta in zip(sources, deltas):
            part, err = truncated_svd(delta, layer.rank)
            worst = max(worst, err)
            if layer.magnitude is not None:
                part.magnitude = n0 + w * (layer.magnitude.float() - n0)
            parts[i][key] = part
    make = lambda layers, src: Adapter(layers=layers, use_dora=src.use_dora, info=dict(src.info))
    return make(parts[0], subject), make(parts[1], style), worst


def _ties(deltas: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    """TIES-merging: keep each ΔW's top-density entries, elect a sign per entry, drop disagreeing ones."""
    trimmed = []
    for d in deltas:
        k = max(1, int(round(density * d.numel())))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    sign = torch.sign(sum(trimmed))
    return [torch.where(torch.sign(t) == sign, t, torch.zeros_like(t)) for t in trimmed]


def _dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries with probability 1 − density and rescale the rest by 1/density."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))
