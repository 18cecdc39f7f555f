"""A merge's two parts and their exact algebra: scaling, concatenation into one standard file; the direct merge
and B-LoRA, which only scale or select parts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters import Adapter, LoraLayer, direction_and_magnitude, resolve_module, row_norm
from ..config import MergeConfig, family_defaults
from ..errors import ZipqError


def scaled_part(layer: LoraLayer, column_scale: torch.Tensor | None, row_coef: torch.Tensor | None,
                 n0: torch.Tensor, weight: float = 1.0) -> LoraLayer:
    """A layer with its scale folded into `up`, columns scaled by `column_scale` and magnitude shift by `row_coef`.

    down' = down·diag(col) (conv: per input channel), up' = weight·scale·up, m' = ‖W0‖ + weight·a ⊙ (m − ‖W0‖).
    """
    down = layer.down.float()
    if column_scale is not None:
        down = down * column_scale.view(1, -1, *([1] * (down.dim() - 2)))
    magnitude = None
    if layer.magnitude is not None:
        shift = layer.magnitude.float() - n0
        magnitude = n0 + weight * (shift if row_coef is None else row_coef * shift)
    return LoraLayer(down=down, up=weight * layer.scale * layer.up.float(), scale=1.0, magnitude=magnitude)


def concat_parts(w0: torch.Tensor, parts: Sequence[LoraLayer]) -> LoraLayer:
    """Parts of one module → one layer of rank Σr whose DoRA forward equals the fused parts exactly.

    The direction W0 + Σ up_i·down_i is the concatenation; the magnitude is the fused target m (signed,
    so even a row whose m crossed zero is reproduced).
    """
    down = torch.cat([p.down.float() * p.scale for p in parts])
    up = torch.cat([p.up.float() for p in parts], dim=1)
    _, magnitude = direction_and_magnitude(w0, [(p, 1.0) for p in parts])
    return LoraLayer(down=down, up=up, scale=1.0, magnitude=magnitude)


def combine_parts(pipe, subject_part: Adapter, style_part: Adapter, info: dict) -> Adapter:
    """The single standard adapter equal to subject_part + style_part at strength 1."""
    keys = sorted(set(subject_part.layers) | set(style_part.layers))
    dora = any(a.layers[k].magnitude is not None for a in (subject_part, style_part) for k in a.layers)
    layers = {}
    for key in keys:
        parts = [a.layers[key] for a in (subject_part, style_part) if key in a.layers]
        w0 = resolve_module(pipe, key).weight.data.float()
        layer = concat_parts(w0, parts)
        if dora and layer.magnitude is None:
            # a DoRA file (peft, diffusers) has a magnitude on every layer: a plain LoRA layer beside DoRA ones
            # (a DoRA merged with a LoRA) gets m = ‖W0 + ΔW‖, which gives W0 + ΔW exactly on this base
            layer.magnitude = row_norm(w0 + layer.delta())
        layers[key] = layer
    return Adapter(layers=layers, use_dora=dora, info=info)


def base_norms(pipe, keys) -> dict[str, torch.Tensor]:
    return {k: row_norm(resolve_module(pipe, k).weight.data.float()).cpu() for k in keys}


# ---------------------------------------------------------------------------------------------------------
# Training-free methods on the parts themselves
# ---------------------------------------------------------------------------------------------------------

def direct_parts(pipe, subject: Adapter, style: Adapter, cfg: MergeConfig) -> tuple[Adapter, Adapter]:
    """Weighted sum with the strength semantics of DESIGN §6."""
    return (_weighted(pipe, subject, cfg.subject_weight), _weighted(pipe, style, cfg.style_weight))


def _weighted(pipe, adapter: Adapter, weight: float, keep: Sequence[str] | None = None) -> Adapter:
    norms = base_norms(pipe, adapter.layers)
    layers = {k: scaled_part(x, None, None, norms[k], weight) for k, x in adapter.layers.items()
              if keep is None or k.startswith(tuple(keep))}
    return Adapter(layers=layers, use_dora=adapter.use_dora, info=dict(adapter.info))


def blora_split(cfg: MergeConfig, family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """B-LoRA's (content, style) blocks as layer-name prefixes: the config's, else the base family's."""
    default = family_defaults(family).blora_split
    if default is None and not (cfg.blora_content and cfg.blora_style):
        raise ZipqError(f"B-LoRA has no block split for {family} models (the paper's is SDXL's up_blocks.0); "
                        "choose another merge method, or name the blocks with --blora-content and --blora-style.")
    content = cfg.blora_content or default[0]
    style = cfg.blora_style or default[1]
    return tuple("unet." + p for p in content), tuple("unet." + p for p in style)


def blora_parts(pipe, subject: Adapter, style: Adapter, cfg: MergeConfig, family: str) -> tuple[Adapter, Adapter]:
    """B-LoRA: the subject adapter's content blocks and the style adapter's style blocks (``blora_split``)."""
    content_blocks, style_blocks = blora_split(cfg, family)
    content = _weighted(pipe, subject, cfg.subject_weight, keep=content_blocks)
    look = _weighted(pipe, style, cfg.style_weight, keep=style_blocks)
    if not content.layers or not look.layers:
        raise ZipqError(f"B-LoRA keeps the subject's layers in {', '.join(content_blocks)} and the style's in "
                        f"{', '.join(style_blocks)}, and these adapters have none there: train them on those "
                        "blocks, or choose another merge method.")
    return content, look
