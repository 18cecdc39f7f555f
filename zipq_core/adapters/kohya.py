"""Files for other tools: kohya / A1111 / ComfyUI LoRA and DoRA (DESIGN §8), and importing them back.

`adapters.export.export_adapter` writes a file per tool (its DoRA convention solved, or baked per layer within 1 %);
`export_kohya` below is the single kohya file of earlier versions (DoRA's m as dora_scale, which only LyCORIS
computes as the studio does), kept for its callers.

kohya keys: `lora_unet_<module path, dots → _>.lora_down.weight` [r, in], `.lora_up.weight` [out, r],
`.alpha` (scalar; scale = alpha / r), DoRA `.dora_scale` written 2-D [out, 1] (conv [out, 1, 1, 1]).
Readers disagree on DoRA (1-D vs 2-D, which axis), so `bake=True` writes a plain LoRA instead:
W' − W0 of the DoRA layer, truncated by SVD to rank r, with its relative error reported.
diffusers' `convert_state_dict_to_kohya` mis-renames `lora_magnitude_vector` and always writes alpha = r,
so this module writes the keys itself.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ZipqError
from .apply import resolve_module
from .layer import Adapter, LoraLayer, fuse_weight, truncated_svd

BASE_VERSIONS = {"sdxl": "sdxl_base_v1-0", "sd1": "sd_v1", "sd2": "sd_v2"}
ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base", "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2"}
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
# Header key of a file whose dora_scale was solved for ComfyUI/Forge (÷‖W0‖, adapters.export), not LyCORIS's m.
DORA_CONVENTION_KEY = "zipq.dora_scale_convention"


@dataclass
class ExportReport:
    path: Path
    layers: int
    baked: bool
    max_relative_error: float  # SVD truncation error when baking DoRA, else 0


def kohya_name(key: str, arch: str) -> str:
    """'unet.down_blocks.1.attentions.0…to_q' → 'lora_unet_down_blocks_1_attentions_0…_to_q'."""
    component, _, path = key.partition(".")
    prefix = PREFIXES[component]
    if component == "text_encoder" and arch != "sdxl":
        prefix = "lora_te"
    return f"{prefix}_{path.replace('.', '_')}"


def _bake(pipe, key: str, layer: LoraLayer) -> tuple[LoraLayer, float]:
    """A DoRA layer as a plain LoRA of the same rank: SVD of W' − W0."""
    w0 = resolve_module(pipe, key).weight.data.float().cpu()
    return truncated_svd(fuse_weight(w0, [(layer, 1.0)]) - w0, layer.rank)


def export_kohya(adapter: Adapter, base, out_file: str | Path, bake: bool = False,
                 dtype: torch.dtype = torch.float16) -> ExportReport:
    """Write a kohya-format .safetensors file that A1111, Forge and ComfyUI load.

    Args:
        adapter: the adapter (trained or merged).
        base: the `BaseModel` it belongs to (architecture; base weights when baking).
        out_file: the .safetensors path.
        bake: turn DoRA layers into plain LoRA (widest compatibility, small SVD error).
        dtype: tensor dtype in the file.

    Returns:
        An `ExportReport` with the baking error.
    """
    out = Path(out_file)
    if out.suffix != ".safetensors":
        raise ZipqError("Export to a .safetensors file name.")
    tensors: dict[str, torch.Tensor] = {}
    worst = 0.0
    dora = adapter.use_dora and not bake
    layers = {}
    for key, layer in sorted(adapter.layers.items()):
        if bake and layer.magnitude is not None:
            layer, err = _bake(base.pipe, key, layer)
            worst = max(worst, err)
        layers[key] = layer
    if len({(layer.rank, layer.scale) for layer in layers.values()}) > 1:
        layers = {key: _uniform(layer, max(x.rank for x in layers.values())) for key, layer in layers.items()}
    for key, layer in layers.items():
        name = kohya_name(key, base.arch)
        tensors[f"{name}.lora_down.weight"] = layer.down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=dtype)
        if layer.magnitude is not None:
            shape = (-1, 1, 1, 1) if layer.down.dim() == 4 else (-1, 1)
            tensors[f"{name}.dora_scale"] = layer.magnitude.view(shape).to(dtype).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=_kohya_metadata(adapter, base, dora, list(layers.values())))
    return ExportReport(out, len(adapter.layers), bake and adapter.use_dora, worst)


def _uniform(layer: LoraLayer, rank: int) -> LoraLayer:
    """The layer at `rank` with scale 1: its scale folded into `up`, zero rows and columns added. The same ΔW.

    A file whose layers differ in rank or alpha (a merge: subject and style ranks side by side where both adapt
    a layer) is read with one rank and one alpha for all layers by diffusers' kohya converter (the minority's
    alphas ignored: their change at the wrong scale); one rank and alpha = rank everywhere reads right in every
    tool."""
    pad = rank - layer.rank
    down = torch.cat([layer.down, layer.down.new_zeros(pad, *layer.down.shape[1:])])
    up = layer.up * layer.scale
    up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1)
    return LoraLayer(down, up, 1.0, layer.magnitude)


def _kohya_metadata(adapter: Adapter, base, dora: bool, written: list[LoraLayer]) -> dict[str, str]:
    rank = collections.Counter(layer.rank for layer in written).most_common(1)[0][0]
    alpha = next(layer.scale * layer.rank for layer in written if layer.rank == rank)
    size = base.default_size
    info = adapter.info
    return {
        "ss_base_model_version": BASE_VERSIONS[base.arch],
        "ss_network_module": "lycoris.kohya" if dora else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"algo": "lora", "dora_wd": "True"} if dora else {}),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{ARCHITECTURES[base.arch]}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": str(info.get("name") or info.get("token") or "zipq adapter"),
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.trigger_phrase": str(info.get("instance_prompt", "")),
        "modelspec.merged_from": json.dumps([info.get("subject", {}).get("token"), info.get("style", {}).get("token")])
        if info.get("kind") == "merged" else "",
    }


def adaptable_modules(base) -> Iterator[tuple[str, str]]:
    """(component, module name) of every Linear/Conv2d of the UNet and text encoders: what an adapter file may
    adapt."""
    for component in PREFIXES:
        root = getattr(base.pipe, component, None)
        if root is None:
            continue
        for name, module in root.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                yield component, name


def _name_table(base) -> dict[str, str]:
    """kohya name → our module key, for every Linear/Conv2d of the UNet and text encoders."""
    keys = (f"{component}.{name}" for component, name in adaptable_modules(base))
    return {kohya_name(key, base.arch): key for key in keys}


def import_kohya(path: str | Path, base) -> Adapter:
    """Read a kohya/A1111/ComfyUI LoRA or DoRA file with diffusers-style layer names as an `Adapter`.

    `dora_scale` is accepted 1-D [out] or 2-D [out, 1] ([out, 1, 1, 1] for convs); a scale per input column
    ([1, in], an older LyCORIS convention) is not row-norm DoRA and is refused with a message.

    Args:
        path: the .safetensors file.
        base: the base model the file is for (its layer names resolve the keys).

    Returns:
        The adapter; `info["imported"] = "kohya"`.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ZipqError(f"{path.name}: only .safetensors files are read (pickled files can run code).")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata() or {}
    table = _name_table(base)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.partition(".")
        grouped.setdefault(name, {})[kind] = tensor
    unknown = [n for n in grouped if n not in table]
    if unknown:
        raise ZipqError(f"{path.name}: {len(unknown)} layer names do not match this {base.arch} model (e.g. "
                        f"{unknown[0]}). Files with original (LDM) SDXL names need converting to diffusers names "
                        "first, or the file is for another architecture.")
    layers = {table[name]: _kohya_layer(name, parts, path.name) for name, parts in grouped.items()}
    if header.get(DORA_CONVENTION_KEY) == "comfyui":
        layers = {key: _from_comfyui_scale(base, key, layer) for key, layer in layers.items()}
    info = {"source": path.name, "imported": "kohya", "instance_prompt": header.get("modelspec.trigger_phrase", "")}
    return Adapter(layers=layers, use_dora=any(x.magnitude is not None for x in layers.values()), info=info)


def _from_comfyui_scale(base, key: str, layer: LoraLayer) -> LoraLayer:
    """A dora_scale solved for ComfyUI's ÷‖W0‖ (our export for ComfyUI/Forge) back to DoRA's magnitude m, which
    divides by ‖W0 + ΔW‖: m = dora_scale · ‖W0 + ΔW‖ / ‖W0‖ (exact on the base the file was solved against)."""
    if layer.magnitude is None:
        return layer
    w0 = resolve_module(base.pipe, key).weight.detach().float().cpu()
    ratio = (w0 + layer.delta()).flatten(1).norm(dim=1) / w0.flatten(1).norm(dim=1)
    return LoraLayer(layer.down, layer.up, layer.scale, layer.magnitude * ratio)


def _kohya_layer(name: str, parts: dict[str, torch.Tensor], file: str) -> LoraLayer:
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        raise ZipqError(f"{file}: layer {name} lacks lora_down/lora_up (LoHa/LoKr files are not supported here).")
    down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    magnitude = None
    if "dora_scale" in parts:
        scale = parts["dora_scale"].float()
        if scale.numel() != up.shape[0]:
            raise ZipqError(f"{file}: {name}.dora_scale has shape {tuple(scale.shape)}, a scale per input column; "
                            "only per-output DoRA ([out, 1]) is supported. Bake it to a plain LoRA first.")
        magnitude = scale.flatten()
    return LoraLayer(down=down, up=up, scale=alpha / rank, magnitude=magnitude)
