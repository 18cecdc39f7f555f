"""The adapter folder: its layout, and the one writer and reader of adapter files.

An adapter is a folder:
    pytorch_lora_weights.safetensors   peft-style keys `unet.<module>.lora_A.weight` [r, in], `.lora_B.weight`
                                        [out, r], DoRA `.lora_magnitude_vector` [out], plus the
                                        `lora_adapter_metadata` that diffusers reads (r, lora_alpha, use_dora,
                                        target_modules); without it diffusers assumes alpha = r.
    adapter.json                        the sidecar: base model, kind, token, prompts, config, loss curve, timings.
    train_images/                       the cropped training views and captions.json (ZipLoRA merging needs them).
    checkpoints/step-NNNNNN/            resumable training state (removed when a training finishes).
    parts/subject, parts/style          a merged adapter's two parts (adapter folders themselves), for sliders.
`save_adapter` also writes INT8 storage (adapters.int8): the same folder, the factors packed as int8.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ZipqError
from .int8 import INT8_FLAG, LAYOUT_KEY, dequantize_state_dict, quantize_state_dict
from .layer import Adapter, LoraLayer

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# An INT8 adapter is this project's own format (no other tool dequantizes it): a name and a header that no tool
# takes for a standard LoRA file. `python -m zipq_core export` turns it into a file other tools read.
INT8_WEIGHTS_NAME = "zipq_int8_adapter.safetensors"
SIDECAR_NAME = "adapter.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
OWN_METADATA_KEY = "zipq.lora_config"  # the same facts in a file only this project reads
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # what peft's save_pretrained writes
TRAIN_IMAGES_DIR = "train_images"
CHECKPOINT_DIR = "checkpoints"
PARTS_DIR = "parts"
INT8_DIR = "int8"  # an INT8 copy beside a trained adapter (TrainStep / CLI --int8-adapter)
Storage = Literal["float", "int8"]


def has_adapter(folder: str | Path) -> bool:
    """Whether a folder holds a finished adapter (its weights file)."""
    return (Path(folder) / WEIGHTS_NAME).exists()


def _lora_config_dict(adapter: Adapter) -> dict:
    """The LoraConfig fields diffusers rebuilds the adapter from (per-module patterns for mixed ranks)."""
    rank = adapter.rank
    scales = collections.Counter(x.scale for x in adapter.layers.values() if x.rank == rank)
    scale = scales.most_common(1)[0][0]
    rank_pattern, alpha_pattern = {}, {}
    for key, layer in adapter.layers.items():
        path = key.partition(".")[2]
        if layer.rank != rank:
            rank_pattern[path] = layer.rank
        if abs(layer.scale * layer.rank - scale * rank) > 1e-6 * rank or layer.rank != rank:
            alpha_pattern[path] = layer.scale * layer.rank
    targets = sorted({key.partition(".")[2] for key in adapter.layers})
    return {"r": rank, "lora_alpha": scale * rank, "use_dora": adapter.use_dora, "target_modules": targets,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "init_lora_weights": True,
            "lora_dropout": 0.0, "bias": "none"}


def header_info(info: dict) -> str:
    """The sidecar as a compact header string, without the per-step loss curve (it stays in adapter.json)."""
    return json.dumps({k: v for k, v in info.items() if k != "loss_curve"}, sort_keys=True, default=str,
                      separators=(",", ":"))


def lora_metadata(adapter: Adapter) -> dict:
    """diffusers' `lora_adapter_metadata`: the LoraConfig fields, prefixed by component ("unet.r", …)."""
    components = sorted({k.partition(".")[0] for k in adapter.layers})
    return {f"{c}.{k}": v for c in components for k, v in _lora_config_dict(adapter).items()}


def adapter_state_dict(adapter: Adapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Peft-style tensors keyed as diffusers' `load_lora_weights` expects them."""
    out: dict[str, torch.Tensor] = {}
    for key, layer in adapter.layers.items():
        out[f"{key}.lora_A.weight"] = layer.down.to(dtype).contiguous()
        out[f"{key}.lora_B.weight"] = layer.up.to(dtype).contiguous()
        if layer.magnitude is not None:
            magnitude = layer.magnitude.to(dtype).flatten()
            if layer.down.dim() == 4:  # peft keeps conv magnitudes as [1, out, 1, 1]
                magnitude = magnitude.view(1, -1, 1, 1)
            out[f"{key}.lora_magnitude_vector"] = magnitude.contiguous()
    return out


def save_adapter(adapter: Adapter, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                 storage: Storage = "float") -> Path:
    """Write the adapter folder's weights (with diffusers' metadata) and its JSON sidecar.

    Args:
        adapter: what to save.
        out_dir: folder, created if needed.
        dtype: tensor dtype in the file (fp16 halves the size; fp32 keeps training exactness).
        storage: "float", or "int8": factors as int8 with a scale per rank component (adapters.int8, half the
            size of fp16), flagged in the header; `load_adapter` dequantizes it.

    Returns:
        The path of the weights file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(adapter, dtype)
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ZipqError(f"Refusing to save: {name} holds non-finite values (the training diverged; "
                            "lower the learning rate).")
    info = dict(adapter.info)
    config = json.dumps(lora_metadata(adapter), sort_keys=True)
    metadata = {"format": "pt", METADATA_KEY: config}
    path = out / WEIGHTS_NAME
    if storage == "int8":
        tensors, layout = quantize_state_dict(tensors)
        metadata = {"format": "zipq-int8", OWN_METADATA_KEY: config, INT8_FLAG: "1", LAYOUT_KEY: layout}
        info["storage"] = "int8"
        path = out / INT8_WEIGHTS_NAME
    metadata["zipq.info"] = header_info(info)
    # never leave a half-written adapter where a loader would find it; the temporary name is the process's own, so
    # two writers (processes of one launch) never rename each other's file
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    (out / SIDECAR_NAME).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return path


def find_weights_file(source: str | Path) -> Path:
    """An adapter folder or file → the safetensors file to read."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME, INT8_WEIGHTS_NAME):
            if (path / name).exists():
                return path / name
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
        raise ZipqError(f"No adapter file in {path}: expected {WEIGHTS_NAME} (or exactly one .safetensors).")
    if not path.exists():
        raise ZipqError(f"Adapter {path} does not exist.")
    if path.suffix != ".safetensors":
        raise ZipqError(f"{path.name}: adapters are read from .safetensors files only (pickled files can run code).")
    return path


def _split_key(key: str) -> tuple[str, str]:
    """'unet.x.y.lora_A.weight' → ('unet.x.y', 'lora_A'); handles the older '.lora.down.weight' names."""
    for suffix, kind in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                         (".lora.up.weight", "up"), (".lora_magnitude_vector", "magnitude"),
                         (".lora_magnitude_vector.weight", "magnitude"), (".alpha", "alpha")):
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return key, "unknown"


def load_adapter(source: str | Path) -> Adapter:
    """Read an adapter written by this project, diffusers or peft.

    Args:
        source: a folder holding `pytorch_lora_weights.safetensors` (or peft's `adapter_model.safetensors`),
            or a `.safetensors` file.

    Returns:
        The `Adapter`, its sidecar in `info` when present.
    """
    path = find_weights_file(source)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ZipqError(f"{path.name} is not a readable safetensors file: {e}") from e
    tensors = dequantize_state_dict(tensors, header)  # INT8 adapters dequantize on load
    config = json.loads(header.get(METADATA_KEY) or header.get(OWN_METADATA_KEY) or "{}")
    info = json.loads(header.get("zipq.info", "{}") or "{}")
    sidecar = path.parent / SIDECAR_NAME
    if sidecar.exists() and path.name in (WEIGHTS_NAME, INT8_WEIGHTS_NAME):
        info = json.loads(sidecar.read_text())
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in tensors):
        raise ZipqError(f"{path.name} is a kohya/A1111 LoRA; this version reads adapters in the diffusers or peft "
                        "layout only (a folder with pytorch_lora_weights.safetensors or adapter_model.safetensors). "
                        "Use an adapter trained here, or convert the file to the diffusers layout first.")
    parts: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in tensors.items():
        module, kind = _split_key(key)
        if kind == "unknown":
            continue
        if not module.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
            module = "unet." + module.removeprefix("base_model.model.")  # bare peft keys are UNet keys
        parts[module][kind] = tensor
    layers: dict[str, LoraLayer] = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ZipqError(f"{path.name}: layer {module} lacks its lora_A/lora_B pair; the file is incomplete.")
        rank = p["down"].shape[0]
        prefix = module.partition(".")[0]
        layers[module] = LoraLayer(down=p["down"].float(), up=p["up"].float(),
                                   scale=_scale_for(module, rank, config, prefix, p.get("alpha")),
                                   magnitude=None if "magnitude" not in p else p["magnitude"].float().flatten())
    if not layers:
        raise ZipqError(f"{path.name} holds no LoRA/DoRA layers.")
    use_dora = any(layer.magnitude is not None for layer in layers.values())
    return Adapter(layers=layers, use_dora=use_dora, info=info)


def _scale_for(module: str, rank: int, config: dict, prefix: str, alpha: torch.Tensor | None) -> float:
    """alpha / r for one layer, from per-layer alpha tensors, diffusers metadata patterns, or alpha = r."""
    if alpha is not None:
        return float(alpha) / rank
    path = module.partition(".")[2]
    alpha_pattern = config.get(f"{prefix}.alpha_pattern") or {}
    if path in alpha_pattern:
        return float(alpha_pattern[path]) / rank
    if f"{prefix}.lora_alpha" in config:
        return float(config[f"{prefix}.lora_alpha"]) / float(config.get(f"{prefix}.r", rank))
    return 1.0


def save_training_views(images: list[Image.Image], captions: list[str], out_dir: str | Path) -> None:
    """Keep the prepared training views and captions beside the adapter.

    ZipLoRA/ZipQDoRA merging needs each adapter's own images and prompts (DESIGN §7); storing the cropped views
    (a few kB each at 64 px) makes an adapter folder self-sufficient for merging.
    """
    folder = Path(out_dir) / TRAIN_IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        name = f"{i:03d}.png"
        image.save(folder / name)
        names[name] = caption
    (folder / "captions.json").write_text(json.dumps(names, indent=1))


def load_training_views(adapter_dir: str | Path) -> tuple[list[Image.Image], list[str]] | None:
    """The training views saved by `save_training_views`, or None for adapters made elsewhere."""
    folder = Path(adapter_dir) / TRAIN_IMAGES_DIR
    if not (folder / "captions.json").exists():
        return None
    captions = json.loads((folder / "captions.json").read_text())
    names = sorted(captions)
    return [Image.open(folder / n).convert("RGB") for n in names], [captions[n] for n in names]
