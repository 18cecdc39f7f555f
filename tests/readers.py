"""Other tools' weight math for kohya-style LoRA/DoRA files, re-implemented for the tests from their sources.

Each function was written from the cited source as a specification (read, not copied) and takes what a tool takes:
the file's tensors and the model's original weights, keyed by the file's layer names. It returns the weight the
tool computes for each layer (fp32, strength/multiplier as given). The export module has its own model of these
conventions; these are the independent check. Name mapping is not modelled here (tests pass the names as the
studio maps them, and check names separately with diffusers' own converter).

Sources (newest snapshots read; line numbers of those versions):
- ComfyUI: comfy/weight_adapter/lora.py `LoRAAdapter.calculate_weight` (Comfy-Org/ComfyUI ee71d5c, lines 248–283:
  alpha = v[2] / mat2.shape[0], the file's alpha over lora_down's rows; lora_diff = mm(up.flatten(1),
  down.flatten(1)); W += strength·alpha·lora_diff, or weight_decompose with dora_scale) and
  comfy/weight_adapter/base.py `weight_decompose` (ComfyUI v0.3.77, lines 42–69: an output-axis dora_scale,
  `dora_scale.shape[0] == out`, is divided by the row norm of the *original* weight, `weight.reshape(out,
  -1).norm(dim=1)`; otherwise by the column norm of W0 + ΔW; `+ finfo.eps`; strength ≠ 1 → W0 + strength·(W_calc −
  W0)).
- Forge: backend/patcher/lora.py `weight_decompose` lines 52–81 (a copy of ComfyUI's, cited there) and the "lora"
  patch branch lines 145–177 (alpha = v[2] / mat2.shape[0]; W += strength·alpha·up@down).
- AUTOMATIC1111: extensions-builtin/Lora/network.py (v1.10) `NetworkModule.calc_scale`, `apply_weight_decompose`,
  `finalize_updown` and network_lora.py `calc_updown` (as vendored in Forge's
  packages_3rdparty/webui_lora_collection/network.py lines 167–216 and network_lora.py lines 71–86): updown = up@down
  · alpha/dim (dim = lora_down.shape[0]); with dora_scale, W0 + updown is divided by its norm per *input column*
  (transpose(0, 1)…norm(dim=1)) and multiplied by dora_scale (broadcast), minus W0; the result times the multiplier.
- LyCORIS: lycoris/modules/locon.py (KohakuBlueleaf/LyCORIS f49d30d): scale = alpha / r (line 146), make_weight =
  up.view(out, -1) @ down.view(r, -1) (lines 198–219), forward / get_merged_weight (lines 221–237, 308–327): W =
  decompose(W0 + scale·ΔW); apply_weight_decompose (lines 239–260) with wd_on_out (default True, line 52): divide by
  the row norm of W0 + ΔW (+ eps), times dora_scale; multiplier m ≠ 1 → scale' = m·(s − 1) + 1.
- kohya sd-scripts: networks/lora.py (kohya-ss/sd-scripts 48d368f) create_network_from_weights lines 820–840 (dim =
  lora_down.shape[0], alpha per module, alpha = dim when absent), LoRAModule scale = alpha / lora_dim (line 72),
  merge_to lines 162–191 (W + multiplier·up@down·scale; 3×3 conv via conv2d of the factors, the same product).
  LoRAModule has no dora_scale: the key is ignored.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def layers_of(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{'lora_unet_x.lora_down.weight': t, …} → {'lora_unet_x': {'lora_down.weight': t, …}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        grouped.setdefault(name, {})[part] = tensor
    return grouped


def _product(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """up @ down in fp32 with the weight's shape (a 3×3 conv's factors [out, r, 1, 1] and [r, in, 3, 3])."""
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def _alpha_over_rank(parts: dict[str, torch.Tensor]) -> float:
    rank = parts["lora_down.weight"].shape[0]
    return float(parts["alpha"]) / rank if "alpha" in parts else 1.0


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖row‖ of [out, …] shaped [out, 1, …] for broadcasting."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def _column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖column‖ of [out, in, …] over out (and kernel) shaped [1, in, 1, …]."""
    t = weight.transpose(0, 1)
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape(t.shape[0], *[1] * (weight.dim() - 1)).transpose(0, 1)


def comfyui(tensors: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], strength: float = 1.0
            ) -> dict[str, torch.Tensor]:
    """ComfyUI's (and Forge's) weight for every layer of a kohya LoRA/DoRA file."""
    out = {}
    for name, parts in layers_of(tensors).items():
        w0 = originals[name].float()
        diff = _product(parts, w0.shape) * _alpha_over_rank(parts)
        if "dora_scale" not in parts:
            out[name] = w0 + strength * diff
            continue
        scale = parts["dora_scale"].float()
        calc = w0 + diff
        norm = _row_norm(w0) if scale.shape[0] == w0.shape[0] else _column_norm(calc)
        calc = calc * (scale / (norm + EPS))
        out[name] = calc if strength == 1.0 else w0 + strength * (calc - w0)
    return out


forge = comfyui  # Forge's backend/patcher/lora.py weight_decompose is ComfyUI's (same branch on the axis, same eps)


def a1111(tensors: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], multiplier: float = 1.0
          ) -> dict[str, torch.Tensor]:
    """AUTOMATIC1111's built-in Lora extension."""
    out = {}
    for name, parts in layers_of(tensors).items():
        w0 = originals[name].float()
        updown = _product(parts, w0.shape) * _alpha_over_rank(parts)
        if "dora_scale" in parts:
            merged = w0 + updown
            updown = merged * (parts["dora_scale"].float() / _column_norm(merged)) - w0  # broadcasts [out, 1]
        out[name] = w0 + multiplier * updown
    return out


def lycoris(tensors: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], multiplier: float = 1.0
            ) -> dict[str, torch.Tensor]:
    """LyCORIS's LoConModule (the `lora` algo) with wd_on_out=True."""
    out = {}
    for name, parts in layers_of(tensors).items():
        w0 = originals[name].float()
        diff = _product(parts, w0.shape) * _alpha_over_rank(parts)
        if "dora_scale" not in parts:
            out[name] = w0 + multiplier * diff
            continue
        weight = w0 + diff
        scale = parts["dora_scale"].float().reshape(w0.shape[0], *[1] * (w0.dim() - 1)) / (_row_norm(weight) + EPS)
        if multiplier != 1:
            scale = multiplier * (scale - 1) + 1
        out[name] = weight * scale
    return out


def sd_scripts(tensors: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], multiplier: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """kohya sd-scripts' networks.lora (merge_to); dora_scale has no place in its modules and is ignored."""
    out = {}
    for name, parts in layers_of(tensors).items():
        w0 = originals[name].float()
        rank = parts["lora_down.weight"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else rank
        out[name] = w0 + multiplier * _product(parts, w0.shape) * (alpha / rank)
    return out


READERS = {"comfyui": comfyui, "forge": forge, "a1111": a1111, "lycoris": lycoris, "kohya": sd_scripts}
