"""A merge's two parts and their exact algebra: scaling, concatenation into one standard file; the direct merge
and B-LoRA, which only scale or select parts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters import Adapter, LoraLayer, direction_and_magnitude, resolve_module, row_norm
from ..config import MergeConfig
from ..errors import ZipqError

# B-LoRA (SDXL): content lives in the first attention of up_blocks.0, style in the second.
BLORA_CONTENT = "unet.up_blocks.0.attentions.0."
BLORA_STYLE = "unet.up_blocks.0.attentions.1."


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


def _weighted(pipe, adapter: Adapter, weight: float, keep: str | None = None) -> Adapter:
    norms = base_norms(pipe, adapter.layers)
    layers = {k: scaled_part(x, None, None, norms[k], weight) for k, x in adapter.layers.items()
              if keep is None or k.startswith(keep)}
    return Adapter(layers=layers, use_dora=adapter.use_dora, info=dict(adapter.info))


def blora_parts(pipe, subject: Adapter, style: Adapter, cfg: MergeConfig) -> tuple[Adapter, Adapter]:
    """B-LoRA: the subject adapter's content block and the style adapter's style block (SDXL layout)."""
    content = _weighted(pipe, subject, cfg.subject_weight, keep=BLORA_CONTENT)
    look = _weighted(pipe, style, cfg.style_weight, keep=BLORA_STYLE)
    if not content.layers or not look.layers:
        raise ZipqError("B-LoRA needs adapters on SDXL's up_blocks.0.attentions.0 (content) and .1 (style); "
                        "these adapters have none there (SD1.x models lack that layout).")
    return content, look
