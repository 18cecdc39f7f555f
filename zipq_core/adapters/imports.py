"""Adapter files other tools write, read as the studio's `Adapter` (DESIGN §8, §11): one entry point.

`import_adapter(source, base)` reads, by what the file holds (not by its name):
- our folder and diffusers files (`unet.….lora_A.weight` / `lora_B`, with or without `lora_adapter_metadata`;
  without it alpha = r, what diffusers assumes), old diffusers attention-processor names
  (`….processor.to_q_lora.down.weight`);
- peft folders: `adapter_model.safetensors` + `adapter_config.json` (lora_alpha, r, rank_pattern, alpha_pattern,
  use_rslora, use_dora; LoRA, LoHa and LoKr);
- kohya / LyCORIS files (`lora_unet_…`, `lora_te_…`, `lora_te1_…`, `lora_te2_…`) with diffusers-style or
  original (LDM/SGM: `input_blocks_4_1_…`) layer names: LoRA (`.alpha`, LoCon `lora_mid`), LoHa, LoKr, and DoRA
  with `dora_scale` per output row ([out, 1]: the studio's form) or per input column ([1, in]: older LyCORIS
  and A1111's math, W' = s ⊙ (W0 + ΔW) / ‖columns‖).

Every layer becomes a low-rank `LoraLayer`, exactly where the tool's math allows it: a LoHa's Hadamard product
of two rank-r products is a rank-r² product, a LoKr's Kronecker product of products is the product of the
Kronecker products. Where that rank would exceed the layer's (or for column DoRA, which is not low rank),
the layer is the truncated SVD of the tool's ΔW at the smallest rank within `SVD_TOLERANCE` of it, and the
error is reported in `info["conversion"]`. Only safetensors are read (pickles can run code), up to a size limit.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ZipqError
from .apply import resolve_module
from .folder import INT8_WEIGHTS_NAME, PEFT_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter
from .int8 import INT8_FLAG, LAYOUT_KEY
from .kohya import DORA_CONVENTION_KEY, PREFIXES, adaptable_modules, kohya_name
from .layer import Adapter, LoraLayer, fuse_weight, row_norm

# Real SDXL LoRAs are 50–900 MB; the environment variable raises (or lowers) the limit for a deployment.
MAX_ADAPTER_BYTES = int(os.environ.get("ZIPQ_MAX_ADAPTER_BYTES", 1 << 30))
PEFT_CONFIG_NAME = "adapter_config.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# The bound is 1 % of each layer's change; conversions aim at half of it so that the file's own
# fp16/bf16 rounding still fits.
SVD_TOLERANCE = 0.005
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_OTHER_ARCHITECTURES = {  # key fragments of adapters for models this studio does not run
    "double_blocks": "Flux", "single_blocks": "Flux", "single_transformer_blocks": "Flux",
    "joint_blocks": "SD3", "transformer_blocks.0.attn.add_q_proj": "SD3/Flux", "lora_transformer_": "a DiT model",
    "diffusion_model.layers": "a DiT model", "lora_prior_unet_": "Stable Cascade",
}
_TO_SAFETENSORS = ("python -c \"import sys, torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, v "
                   "in torch.load(sys.argv[1], weights_only=True).items()}}, sys.argv[2])\" {src} {dst}")


@dataclass
class _Layer:
    """One layer as the file states it: ΔW = scale · up @ down on the flattened weight ([out, in·kh·kw])."""

    up: torch.Tensor  # [out, R]
    down: torch.Tensor  # [R, in·kh·kw]
    scale: float


# ---------------------------------------------------------------------------------------------------------
# Finding and opening the file
# ---------------------------------------------------------------------------------------------------------

def _locate(source: str | Path) -> tuple[Path, Path | None]:
    """A file or folder → (the safetensors file, peft's adapter_config.json beside it or None)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ZipqError(f"Adapter {path} does not exist.")
    if path.is_dir():
        found = [path / n for n in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME, INT8_WEIGHTS_NAME) if (path / n).exists()]
        found = found or sorted(path.glob("*.safetensors"))
        if len(found) != 1 and not (found and found[0].name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME)):
            pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            what = f"only pickled weights ({', '.join(pickles)})" if pickles and not found else \
                f"{len(found)} .safetensors files"
            raise ZipqError(f"{path} holds {what}; pass the adapter's .safetensors file itself, or a folder "
                            f"with {WEIGHTS_NAME} or {PEFT_WEIGHTS_NAME}.")
        path = found[0]
    config = path.parent / PEFT_CONFIG_NAME
    return path, config if config.exists() else None


def _check_file(path: Path, max_bytes: int | None) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        dst = path.with_suffix(".safetensors").name
        raise ZipqError(f"{path.name} is a pickled PyTorch file: only .safetensors adapters are read (unpickling "
                        "can run code). If you trust its source, convert it (tensors only, no code runs):\n  "
                        + _TO_SAFETENSORS.format(src=path.name, dst=dst))
    if path.suffix.lower() != ".safetensors":
        raise ZipqError(f"{path.name}: adapters are read from .safetensors files only.")
    limit = MAX_ADAPTER_BYTES if max_bytes is None else max_bytes
    size = path.stat().st_size
    if size > limit:
        raise ZipqError(f"{path.name} is {size / 2**20:,.0f} MiB, over the adapter size limit of "
                        f"{limit / 2**20:,.0f} MiB. Raise the limit with ZIPQ_MAX_ADAPTER_BYTES={size} (environment) "
                        "if the file is what you meant to load.")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise ZipqError(f"{path.name} is not a readable safetensors file: {e}") from e


def _read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key → shape and the header, without loading any tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise ZipqError(f"{path.name} is not a readable safetensors file: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# What a file is
# ---------------------------------------------------------------------------------------------------------

def _other_architecture(keys: list[str], header: dict[str, str]) -> str | None:
    declared = (header.get("modelspec.architecture") or header.get("ss_base_model_version") or "").lower()
    for word, name in (("flux", "Flux"), ("sd3", "SD3"), ("stable-diffusion-3", "SD3"), ("pixart", "PixArt"),
                       ("cascade", "Stable Cascade"), ("hunyuan", "HunyuanDiT"), ("auraflow", "AuraFlow")):
        if word in declared:
            return name
    for key in keys:
        for fragment, name in _OTHER_ARCHITECTURES.items():
            if fragment in key:
                return name
    return None


def _declared_arch(keys: list[str], shapes: dict[str, tuple[int, ...]], header: dict[str, str]) -> str | None:
    """'SDXL', 'SD1.x' or 'SD2.x' from the header, text-encoder prefixes or the cross-attention width."""
    declared = (header.get("modelspec.architecture") or header.get("ss_base_model_version") or "").lower()
    if "xl" in declared:
        return "SDXL"
    if "v1" in declared or "sd1" in declared:
        return "SD1.x"
    if "v2" in declared or "sd2" in declared:
        return "SD2.x"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL"
    for key, shape in shapes.items():  # attn2.to_k reads the text features: 768 SD1, 1024 SD2, 2048 SDXL
        if "attn2" in key and "to_k" in key and ("lora_down" in key or "lora_A" in key or "down." in key):
            return {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(shape[-1])
    return None


def _kind(keys: list[str], header: dict[str, str], config: dict | None) -> str:
    """A short name for the kind of adapter the keys hold."""
    if any(".hada_" in k for k in keys):
        algo = "LoHa"
    elif any(".lokr_" in k for k in keys):
        algo = "LoKr"
    elif any(k.endswith(".dora_scale") or "lora_magnitude_vector" in k for k in keys):
        algo = "DoRA"
    elif any(k.endswith((".oft_blocks", ".oft_diag", ".oft_R.weight")) for k in keys):
        algo = "OFT/BOFT"
    elif any(k.endswith(".diff") for k in keys):
        algo = "full-difference (LyCORIS 'full')"
    elif any(k.endswith((".a1.weight", ".w_norm", ".on_input")) for k in keys):
        algo = "GLoRA/IA3"
    else:
        algo = "LoRA"
    if header.get(INT8_FLAG):  # packed blobs: the layout in the header says what they hold
        layout = json.loads(header.get(LAYOUT_KEY) or "[]")
        dora = any(entry[3] for entry in layout if len(entry) > 3)
        return f"ZipQ INT8 {'DoRA' if dora else 'LoRA'} adapter (this studio's own storage; `export` writes others)"
    if config is not None:
        return f"peft {config.get('peft_type', 'LORA').upper()} folder ({PEFT_CONFIG_NAME})"
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        names = "original (LDM/SGM) names" if any(re.match(r"lora_unet_(input|middle|output)_block", k)
                                                  for k in keys) else "diffusers-style names"
        tool = "LyCORIS" if algo in ("LoHa", "LoKr") or any(".lora_mid." in k for k in keys) else "kohya"
        te = ", with text encoder" if any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for k in keys) else ""
        return f"{tool} {algo} ({names}{te})"
    if _is_old_diffusers(keys):
        return f"diffusers {algo} with old attention-processor names (to_q_lora…)"
    if any(".lora_A." in k or ".lora.down." in k or "hada_" in k or "lokr_" in k for k in keys):
        owner = "ZipQ" if "zipq.info" in header else "diffusers/peft"
        meta = "with" if "lora_adapter_metadata" in header or "zipq.lora_config" in header else "without"
        return f"{owner} {algo} file ({meta} metadata)"
    return "not an adapter this studio knows"


def describe_file(source: str | Path) -> str:
    """What an adapter file (or folder) is, in a few words, from its names and header (no tensor is loaded).

    Args:
        source: a .safetensors file, a folder, or any other file (pickles are named, not opened).

    Returns:
        e.g. "kohya LoRA (original (LDM/SGM) names, with text encoder) for SDXL, 722 layers, rank 32, 228 MB".
    """
    path = Path(source).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"pickled PyTorch file ({path.suffix}): not read (unpickling can run code)"
    weights, config_path = _locate(path)
    if weights.suffix.lower() != ".safetensors":
        return f"{weights.suffix or 'extensionless'} file: not a .safetensors adapter"
    shapes, header = _read_shapes(weights)
    keys = list(shapes)
    config = json.loads(config_path.read_text()) if config_path is not None else None
    other = _other_architecture(keys, header)
    kind = _kind(keys, header, config)
    arch = other or _declared_arch(keys, shapes, header)
    layers = {_layer_name(k) for k in keys}
    if header.get(INT8_FLAG):
        layers = {entry[0] for entry in json.loads(header.get(LAYOUT_KEY) or "[]")}
    ranks = [s[0] for k, s in shapes.items() if k.endswith(("lora_down.weight", "lora_A.weight", "hada_w1_b"))]
    rank = f", rank {max(set(ranks), key=ranks.count)}" if ranks else ""
    size = weights.stat().st_size
    size_text = f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size / 1e3:,.1f} kB"
    return f"{kind}{f' for {arch}' if arch else ''}, {len(layers)} layers{rank}, {size_text}"


def _layer_name(key: str) -> str:
    if key.startswith(KOHYA_PREFIXES):
        return key.partition(".")[0]
    for marker in (".lora_A", ".lora_B", ".lora.", ".lora_magnitude_vector", ".processor.", ".hada_", ".lokr_",
                   ".alpha", ".lora_linear_layer", "_lora."):
        if marker in key:
            return key.partition(marker)[0]
    return key


# ---------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------

def import_adapter(source: str | Path, base=None, max_bytes: int | None = None) -> Adapter:
    """Read an adapter file or folder of any supported kind as the studio's `Adapter`.

    Args:
        source: a .safetensors file, our adapter folder, or a peft folder (adapter_model.safetensors +
            adapter_config.json).
        base: the `BaseModel` it is for. Needed for kohya/LyCORIS names, conv LoHa/LoKr shapes and for
            conversions that depend on the base weights (DoRA per input column); our own and diffusers files
            load without it.
        max_bytes: the size limit (default `MAX_ADAPTER_BYTES`, 1 GiB, or ZIPQ_MAX_ADAPTER_BYTES).

    Returns:
        The adapter; `info["imported"]` names what the file was, `info["conversion"]` reports SVD conversions.
    """
    path, config_path = _locate(source)
    _check_file(path, max_bytes)
    shapes, header = _read_shapes(path)
    keys = list(shapes)
    what = _kind(keys, header, None if config_path is None else json.loads(config_path.read_text()))
    if (other := _other_architecture(keys, header)) is not None:
        raise ZipqError(f"{path.name} is an adapter for {other} ({what}); this studio runs UNet Stable Diffusion "
                        "models (SD1.x, SD2.x, SDXL) only. Use it in a tool that runs that model.")
    if any(k.startswith(("model.diffusion_model.", "conditioner.", "first_stage_model.", "cond_stage_model."))
           for k in keys):
        raise ZipqError(f"{path.name} is a full Stable Diffusion checkpoint, not an adapter. Use it as the base "
                        f"model: `python -m zipq_core generate --base {path.name} --out image.png`.")
    if what == "not an adapter this studio knows":
        example = keys[0] if keys else "none"
        raise ZipqError(f"{path.name} holds no adapter layers this studio knows (e.g. key {example}). "
                        "Supported: kohya/LyCORIS LoRA, LoCon, DoRA, LoHa, LoKr; diffusers and peft LoRA files.")
    if any(word in what for word in ("OFT", "full-difference", "GLoRA")):
        raise ZipqError(f"{path.name} is a {what}, which this studio does not convert (supported: LoRA, LoCon, "
                        "DoRA, LoHa, LoKr). Use it in ComfyUI or A1111/Forge, or train a LoRA here.")
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        tensors, _ = _read(path)
        return _import_named(tensors, header, _require_base(base, path, what), path.name, what, _kohya_table)
    if config_path is not None and path.name != WEIGHTS_NAME:
        tensors, _ = _read(path)
        config = json.loads(config_path.read_text())
        return _import_peft(tensors, config, base, path.name, what)
    if _is_old_diffusers(keys):
        tensors, _ = _read(path)
        tensors = _processor_to_diffusers(tensors, path.name)
        return _import_named(tensors, header, _require_base(base, path, what), path.name, what, _module_table)
    if any(k.endswith(("hada_w1_a", "lokr_w1", "lokr_w1_a")) for k in keys):
        tensors, _ = _read(path)
        return _import_peft(tensors, {}, base, path.name, what)
    adapter = load_adapter(path)
    if base is not None:
        adapter = _renamed_text_encoder_keys(adapter, base)
        _check_shapes(adapter, base, path.name, keys, shapes, header)
    if "imported" not in adapter.info and "zipq.info" not in header and not (path.parent / "adapter.json").exists():
        adapter.info = {**adapter.info, "source": path.name, "imported": what}
    return adapter


def _require_base(base, path: Path, what: str):
    if base is None:
        raise ZipqError(f"{path.name} is a {what}: its layer names are resolved against the base model. Pass the "
                        "base it was made for, e.g. `python -m zipq_core generate --base "
                        f"stabilityai/stable-diffusion-xl-base-1.0 --adapter {path.name} --out image.png`.")
    return base


def _renamed_text_encoder_keys(adapter: Adapter, base) -> Adapter:
    """Older transformers named CLIP modules `text_model.encoder.…`; transformers 5 names them `encoder.…`."""
    layers = {}
    for key, layer in adapter.layers.items():
        component, _, path = key.partition(".")
        if component.startswith("text_encoder") and path.startswith("text_model."):
            root = getattr(base.pipe, component, None)
            if root is not None and not _has_module(root, path) and _has_module(root, path[len("text_model."):]):
                key = f"{component}.{path[len('text_model.'):]}"
        layers[key] = layer
    return Adapter(layers=layers, use_dora=adapter.use_dora, info=adapter.info)


def _has_module(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _check_shapes(adapter: Adapter, base, file: str, keys: list[str], shapes: dict, header: dict) -> None:
    for key, layer in adapter.layers.items():
        try:
            weight = resolve_module(base.pipe, key).weight
        except ZipqError:
            _refuse_foreign(file, key, base, keys, shapes, header)
        if layer.delta().shape != weight.shape:
            _refuse_foreign(file, key, base, keys, shapes, header)


def _refuse_foreign(file: str, name: str, base, keys: list[str], shapes: dict, header: dict) -> None:
    arch = _declared_arch(keys, shapes, header)
    made = f"made for {arch}" if arch else "made for another model"
    raise ZipqError(f"{file}: layer {name} does not fit this base model ({base.describe()}): the file was {made}. "
                    "Pass the base it was trained for with --base (e.g. `--base "
                    "stabilityai/stable-diffusion-xl-base-1.0` for SDXL, `--base "
                    "stable-diffusion-v1-5/stable-diffusion-v1-5` for SD1.5).")


# ---------------------------------------------------------------------------------------------------------
# Layer names: kohya (diffusers-style and LDM/SGM), text encoders under transformers 5, old diffusers processors
# ---------------------------------------------------------------------------------------------------------

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
            "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}


def ldm_block_prefixes(unet_config) -> dict[str, str]:
    """diffusers block paths → the original (LDM/SGM) UNet's, from the block structure of a UNet config.

    The LDM UNet numbers its blocks in one sequence: `input_blocks.0` is conv_in, then per down block its
    resnet(+attention) layers and its downsampler (`input_blocks.N.0.op`); `middle_block.0/1/2` are resnet,
    attention, resnet; `output_blocks` hold each up block's layers (one more than a down block) with the
    upsampler after the last layer's resnet and attention (`output_blocks.N.{1|2}.conv`).
    """
    n = len(unet_config["down_block_types"])
    lpb = unet_config["layers_per_block"]
    per = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    table: dict[str, str] = {}
    index = 1
    for i in range(n):
        for j in range(per[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    table.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                  "mid_block.resnets.1": "middle_block.2"})
    index = 0
    for i, block_type in enumerate(unet_config["up_block_types"]):
        layers = per[::-1][i] + 1
        for j in range(layers):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == layers - 1 and i < n - 1:
                upsampler = 2 if "CrossAttn" in block_type else 1
                table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{upsampler}.conv"
            index += 1
    return table


def ldm_path(path: str, prefixes: dict[str, str]) -> str | None:
    """A diffusers UNet module path → the LDM/SGM one, e.g. 'down_blocks.1.resnets.0.conv1' →
    'input_blocks.4.0.in_layers.2' (SD1/SDXL numbering); None for modules the LDM UNet has no name for."""
    if path in _TOP_LDM:
        return _TOP_LDM[path]
    parts = path.split(".")
    for cut in (4, 3):  # 'down_blocks.0.downsamplers.0.conv' has 5 parts with its leaf; blocks have 4 or 3
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest:
                rest = [*_RESNET_LDM.get(rest[0], rest[0]).split("."), *rest[1:]]
            return ".".join([prefixes[head], *rest])
    head = ".".join(parts[:5])
    if head in prefixes and len(parts) == 5:
        return prefixes[head]
    return None


def _kohya_table(base) -> dict[str, str]:
    """kohya layer name → our module key, for every Linear/Conv2d, in all the spellings files use."""
    table: dict[str, str] = {}
    prefixes = ldm_block_prefixes(base.pipe.unet.config)
    for component, name in adaptable_modules(base):
        key = f"{component}.{name}"
        table[kohya_name(key, base.arch)] = key
        if component == "unet":
            if (ldm := ldm_path(name, prefixes)) is not None:
                table[f"lora_unet_{ldm.replace('.', '_')}"] = key
        else:
            te = ["lora_te"] if component == "text_encoder" and base.arch != "sdxl" else []
            te += [PREFIXES[component]]
            bare = name.removeprefix("text_model.").replace(".", "_")
            for prefix in te:  # transformers 5: `encoder.layers…`; kohya files: `text_model_encoder_layers…`
                table[f"{prefix}_text_model_{bare}"] = key
                table[f"{prefix}_{bare}"] = key
    return table


def _module_table(base) -> dict[str, str]:
    """Our module keys (with the older `text_model.` spelling of text-encoder modules) → our module keys."""
    table = {}
    for component, name in adaptable_modules(base):
        table[f"{component}.{name}"] = f"{component}.{name}"
        if component != "unet":
            table[f"{component}.text_model.{name.removeprefix('text_model.')}"] = f"{component}.{name}"
    return table


_PROCESSOR = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.*?)\.(?:processor\.)?"
                        r"(to_q|to_k|to_v|to_out|q_proj|k_proj|v_proj|out_proj)_lora\.(down|up)\.weight$")
_LINEAR_LAYER = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.*)\.lora_linear_layer\.(down|up)\.weight$")
_CLIP_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _is_old_diffusers(keys: list[str]) -> bool:
    return any(".lora_linear_layer." in k or (".processor." in k or "_lora." in k) and _PROCESSOR.match(k)
               for k in keys)


def _processor_to_diffusers(tensors: dict[str, torch.Tensor], file: str) -> dict[str, torch.Tensor]:
    """Old diffusers keys → `<module>\\x00lora_down.weight` groups keyed by our module path.

    UNet attention processors: `…attn1.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`); text
    encoders: `…self_attn.to_q_lora.down.weight` (q_proj…) or `…q_proj.lora_linear_layer.down.weight`. The old
    format has no alphas (alpha = r).
    """
    out = {}
    for key, tensor in tensors.items():
        if (match := _PROCESSOR.match(key)) is not None:
            component, path, proj, kind = match.groups()
            component = component or "unet"
            proj = ("to_out.0" if proj == "to_out" else proj) if component == "unet" else _CLIP_PROJ.get(proj, proj)
        elif (match := _LINEAR_LAYER.match(key)) is not None:
            component, path, kind = match.groups()
            component, proj = component or "unet", None
        else:
            raise ZipqError(f"{file}: key {key} is not part of the old diffusers LoRA format the rest of the file "
                            "uses; the file is damaged or mixes formats. Load it in diffusers and save it again with "
                            "`pipe.save_lora_weights(...)` to get the current format.")
        module = f"{component}.{path}" if proj is None else f"{component}.{path}.{proj}"
        out[f"{module}\x00lora_{kind}.weight"] = tensor
    return out


# ---------------------------------------------------------------------------------------------------------
# Layers: LoRA/LoCon, LoHa, LoKr → up @ down; DoRA in both conventions
# ---------------------------------------------------------------------------------------------------------

def _group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, sep, kind = key.partition("\x00") if "\x00" in key else key.partition(".")
        grouped.setdefault(name, {})[kind] = tensor
    return grouped


def _import_named(tensors: dict[str, torch.Tensor], header: dict, base, file: str, what: str, table_for) -> Adapter:
    table = table_for(base)
    grouped = _group(tensors)
    unknown = [n for n in grouped if n not in table]
    arch = _declared_arch(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()}, header)
    if unknown:
        made = f"made for {arch}, " if arch else ""
        raise ZipqError(f"{file} ({what}, {made}{len(grouped)} layers): {len(unknown)} layer names match no layer of "
                        f"this base model ({base.describe()}), e.g. {unknown[0]}. Pass the base it was trained for "
                        "with --base (e.g. `--base stabilityai/stable-diffusion-xl-base-1.0`).")
    layers: dict[str, LoraLayer] = {}
    errors: dict[str, float] = {}
    for name, parts in grouped.items():
        key = table[name]
        weight = resolve_module(base.pipe, key).weight
        layer, error = _convert(parts, weight, name, file, _kohya_scale, arch)
        if header.get(DORA_CONVENTION_KEY) == "comfyui" and layer.magnitude is not None:
            layer = _from_comfyui_scale(weight, layer)
        layers[key] = layer
        if error is not None:
            errors[key] = error
    info = {"source": file, "imported": what, "instance_prompt": header.get("modelspec.trigger_phrase", ""),
            **_conversion_info(errors)}
    return Adapter(layers=layers, use_dora=any(x.magnitude is not None for x in layers.values()), info=info)


def _from_comfyui_scale(weight: torch.Tensor, layer: LoraLayer) -> LoraLayer:
    """Our ComfyUI/Forge export solves dora_scale for ComfyUI's division by ‖W0‖ per row (adapters.export); DoRA's
    magnitude divides by ‖W0 + ΔW‖: m = dora_scale · ‖W0 + ΔW‖ / ‖W0‖ (exact on the base it was solved against)."""
    w0 = weight.detach().float().cpu()
    ratio = row_norm(w0 + layer.delta()) / row_norm(w0)
    return LoraLayer(layer.down, layer.up, layer.scale, layer.magnitude * ratio)


def _conversion_info(errors: dict[str, float]) -> dict:
    if not errors:
        return {}
    return {"conversion": {"svd_layers": len(errors), "max_relative_error": max(errors.values()),
                           "note": "layers converted by truncated SVD within the stated relative error "
                                   "(‖ΔW_ours − ΔW_file‖ / ‖ΔW_file‖ per layer)"}}


def _kohya_scale(parts: dict[str, torch.Tensor], dim: int, decomposed: bool) -> float:
    """alpha / dim as kohya and LyCORIS read it: no alpha means alpha = dim; a LoKr whose factors are both full
    matrices has scale 1 whatever its alpha (LyCORIS writes alpha = dim then; ComfyUI reads it so)."""
    if "alpha" not in parts or not decomposed:
        return 1.0
    return float(parts["alpha"].float()) / dim


def _convert(parts: dict[str, torch.Tensor], weight: torch.Tensor, name: str, file: str, scale_for,
             made_for: str | None = None) -> tuple[LoraLayer, float | None]:
    """One file layer → a `LoraLayer` for a module with this weight, and the SVD error when one was needed."""
    factors = _factors(parts, name, file, scale_for)
    out, flat_in = weight.shape[0], math.prod(weight.shape[1:])
    if factors.up.shape[0] != out or factors.down.shape[1] != flat_in:
        raise ZipqError(f"{file}: layer {name} has ΔW of {factors.up.shape[0]}×{factors.down.shape[1]}, but the "
                        f"base model's layer is {tuple(weight.shape)}: the file was made for "
                        f"{made_for or 'another model'}. Pass the base it was trained for with --base (e.g. `--base "
                        "stabilityai/stable-diffusion-xl-base-1.0` for SDXL).")
    error = None
    if factors.up.shape[1] > min(out, flat_in):  # a rank above the layer's: store the best rank within the bound
        layer, error = svd_within(factors.scale * factors.up @ factors.down, weight.shape, SVD_TOLERANCE)
    else:
        layer = LoraLayer(down=factors.down.reshape(-1, *weight.shape[1:]).contiguous(),
                          up=factors.up.reshape(out, -1, *([1] * (weight.dim() - 2))).contiguous(),
                          scale=factors.scale)
    if "dora_scale" not in parts:
        return layer, error
    return _with_dora(layer, parts["dora_scale"].float(), weight, name, file, error)


def _factors(parts: dict[str, torch.Tensor], name: str, file: str, scale_for) -> _Layer:
    """ΔW of a LoRA/LoCon, LoHa or LoKr layer as scale · up @ down on the flattened weight."""
    p = {k.removesuffix(".weight"): v.float() for k, v in parts.items()}
    if "lora_down" in p and "lora_up" in p:
        up, down = p["lora_up"].flatten(1), p["lora_down"]
        dim = down.shape[0]
        if "lora_mid" in p:  # LoCon's Tucker form: 1×1 down, k×k mid [r, r, k, k], 1×1 up
            down = torch.einsum("ijkl,jc->ickl", p["lora_mid"], down.flatten(1))
        return _Layer(up, down.flatten(1), scale_for(parts, dim, True))
    if "hada_w1_a" in p:
        (u1, v1), (u2, v2) = _hada_pair(p, "1"), _hada_pair(p, "2")
        # (U1 V1) ⊙ (U2 V2) = (U1 ⊙row U2)(V1 ⊙col V2): entry (o, c) = Σ_ij U1[o,i] U2[o,j] · V1[i,c] V2[j,c]
        up = (u1[:, :, None] * u2[:, None, :]).flatten(1)  # [out, r1·r2]
        down = (v1[:, None, :] * v2[None, :, :]).flatten(0, 1)  # [r1·r2, in·kh·kw]
        return _Layer(up, down, scale_for(parts, v1.shape[0], True))
    if "lokr_w1" in p or "lokr_w1_a" in p:
        u1, v1, dim1 = _lokr_pair(p, "1")
        u2, v2, dim2 = _lokr_pair(p, "2")
        # kron(U1 V1, U2 V2) = kron(U1, U2) · kron(V1, V2); conv: w1[a, c] ⊗ w2[b, d·kh·kw] is ΔW flattened
        dim = dim2 or dim1
        return _Layer(torch.kron(u1.contiguous(), u2.contiguous()), torch.kron(v1.contiguous(), v2.contiguous()),
                      scale_for(parts, dim or 1, dim is not None))
    raise ZipqError(f"{file}: layer {name} holds {sorted(parts)}, none of LoRA (lora_down/lora_up), LoHa (hada_…) "
                    "or LoKr (lokr_…); this kind of layer is not supported.")


def _hada_pair(p: dict[str, torch.Tensor], i: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
    if f"hada_t{i}" in p:  # Tucker (peft's make_weight_cp): a [r, out], b [r, in], t [r, r, kh, kw]
        return a.t(), torch.einsum("ijkl,jc->ickl", p[f"hada_t{i}"], b).flatten(1)
    return a.flatten(1), b.flatten(1)  # a [out, r], b [r, in·kh·kw]


def _lokr_pair(p: dict[str, torch.Tensor], i: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(U, V, decomposition rank or None for a full factor) with U @ V the factor w_i flattened to 2-D."""
    if f"lokr_w{i}" in p:
        w = p[f"lokr_w{i}"].flatten(1)
        eye = lambda n: torch.eye(n, dtype=w.dtype)  # a full factor: w = w · I (or I · w), the smaller rank
        return (w, eye(w.shape[1]), None) if w.shape[1] <= w.shape[0] else (eye(w.shape[0]), w, None)
    a, b = p[f"lokr_w{i}_a"], p[f"lokr_w{i}_b"]
    if f"lokr_t{i}" in p:  # Tucker (peft's lokr make_weight_cp): a [r, b], b [r, d], t [r, r, kh, kw]
        return a.t(), torch.einsum("ijkl,jc->ickl", p[f"lokr_t{i}"], b).flatten(1), a.shape[0]
    return a.flatten(1), b.flatten(1), b.shape[0]


def svd_within(delta: torch.Tensor, shape: torch.Size, tolerance: float) -> tuple[LoraLayer, float]:
    """The smallest-rank truncated SVD of a dense ΔW within `tolerance` relative error (Frobenius), and its error.

    Args:
        delta: ΔW, flattened [out, in·kh·kw] or in the weight's shape.
        shape: the weight's shape.
        tolerance: the largest relative error ‖ΔW − up·down‖ / ‖ΔW‖ accepted.

    Returns:
        The layer (scale 1) and its relative error.
    """
    flat = delta.float().reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    energy = s.square()
    tail = (energy.flip(0).cumsum(0).flip(0) / energy.sum().clamp_min(1e-30)).sqrt()  # error if cut before k
    fits = (torch.cat([tail[1:], tail.new_zeros(1)]) <= tolerance).nonzero()
    rank = int(fits[0]) + 1 if len(fits) else s.numel()
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).reshape(shape[0], rank, *([1] * (len(shape) - 2)))
    down = (vh[:rank] * root[:, None]).reshape(rank, *shape[1:])
    error = float(tail[rank]) if rank < s.numel() else 0.0
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ZipqError("An SVD gave non-finite factors: the adapter holds non-finite or huge values.")
    return LoraLayer(down=down.contiguous(), up=up.contiguous(), scale=1.0), error


def _with_dora(layer: LoraLayer, dora_scale: torch.Tensor, weight: torch.Tensor, name: str, file: str,
               error: float | None) -> tuple[LoraLayer, float | None]:
    """Add a DoRA `dora_scale` in either convention.

    Per output row ([out, 1], [out, 1, 1, 1] or 1-D [out]): W' = s · (W0 + ΔW) / ‖rows‖, the studio's form; s is
    the magnitude as it stands. Per input column ([1, in] or [1, in, 1, 1]; older LyCORIS and A1111):
    W' = (W0 + ΔW) · s / ‖columns‖, which no row-norm DoRA of the same rank expresses: W' is computed from the
    base weight and stored as a DoRA whose magnitude is W''s row norms and whose direction W0 + L has L the
    smallest-rank SVD of W' − W0 that gives W' within `SVD_TOLERANCE`.
    """
    out, inp = weight.shape[0], weight.shape[1]
    by_row = dora_scale.dim() == 1 and dora_scale.numel() == out or dora_scale.dim() > 1 and (
        dora_scale.shape[0] == out and dora_scale[0].numel() == 1)
    if by_row:
        return LoraLayer(layer.down, layer.up, layer.scale, dora_scale.flatten().contiguous()), error
    if dora_scale.numel() != inp:
        raise ZipqError(f"{file}: {name}.dora_scale has shape {tuple(dora_scale.shape)}, neither per output row "
                        f"({out}) nor per input column ({inp}) of a {tuple(weight.shape)} layer: the file is damaged "
                        "or for another model.")
    w0 = weight.detach().float().cpu()
    merged = w0 + layer.delta()
    column_norm = merged.transpose(0, 1).reshape(inp, -1).norm(dim=1)  # [in], over out (and kh, kw)
    target = merged * (dora_scale.flatten() / column_norm).view(1, inp, *([1] * (w0.dim() - 2)))
    return dora_matching(w0, target)


def dora_matching(w0: torch.Tensor, target: torch.Tensor, tolerance: float = SVD_TOLERANCE
                  ) -> tuple[LoraLayer, float]:
    """A row-norm DoRA layer whose fused weight is `target` within `tolerance` of the change (‖·‖ / ‖target − W0‖).

    Magnitude = the target's row norms; direction W0 + L with L the truncated SVD of target − W0 at the smallest
    rank (grown from the SVD's own tolerance) whose fused weight meets the tolerance.
    """
    change = target - w0
    scale = change.norm().clamp_min(1e-30)
    magnitude = row_norm(target)
    flat = change.reshape(w0.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    energy = s.square()
    tail = (energy.flip(0).cumsum(0).flip(0) / energy.sum().clamp_min(1e-30)).sqrt()
    rank = max(1, int((tail > tolerance / 2).sum()))
    while True:
        root = s[:rank].sqrt()
        layer = LoraLayer(down=(vh[:rank] * root[:, None]).reshape(rank, *w0.shape[1:]).contiguous(),
                          up=(u[:, :rank] * root).reshape(w0.shape[0], rank, *([1] * (w0.dim() - 2))).contiguous(),
                          scale=1.0, magnitude=magnitude.contiguous())
        error = float((fuse_weight(w0, [(layer, 1.0)]) - target).norm() / scale)
        if error <= tolerance or rank >= s.numel():
            return layer, error
        rank = min(s.numel(), max(rank + 1, int(rank * 1.25)))


# ---------------------------------------------------------------------------------------------------------
# peft folders (adapter_config.json) and bare peft files
# ---------------------------------------------------------------------------------------------------------

_PEFT_KINDS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight", "lora_magnitude_vector",
               "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
               "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def _pattern_value(patterns: dict, path: str, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module whose path ends with it (as a regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _import_peft(tensors: dict[str, torch.Tensor], config: dict, base, file: str, what: str) -> Adapter:
    """A peft `save_pretrained` file: keys `base_model.model.<path>.lora_A.weight` (or hada_/lokr_), scale from
    adapter_config.json: lora_alpha / r (alpha / √r with use_rslora), with rank_pattern and alpha_pattern."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for kind in _PEFT_KINDS:
            if key.endswith("." + kind):
                module = key[: -len(kind) - 1].removeprefix("base_model.model.")
                grouped.setdefault(module, {})[_PEFT_TO_KOHYA.get(kind, kind)] = tensor
                break
    if not grouped:
        raise ZipqError(f"{file} ({what}) holds no LoRA, LoHa or LoKr layers.")
    base = _require_base(base, Path(file), what)
    layers: dict[str, LoraLayer] = {}
    errors: dict[str, float] = {}
    for module, parts in grouped.items():
        key = _peft_key(module, base, file)
        path = key.partition(".")[2]
        r = int(_pattern_value(config.get("rank_pattern") or {}, path, config.get("r", _rank_of(parts))))
        alpha = config.get("lora_alpha", config.get("alpha", r))  # LoraConfig's lora_alpha, LoHa/LoKrConfig's alpha
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, alpha))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        magnitude = parts.pop("lora_magnitude_vector.weight", parts.pop("lora_magnitude_vector", None))
        weight = resolve_module(base.pipe, key).weight
        layer, error = _convert(parts, weight, module, file, lambda *_, s=scale: s)
        if magnitude is not None:  # peft's DoRA: per output row ([out], conv [1, out, 1, 1])
            layer = LoraLayer(layer.down, layer.up, layer.scale, magnitude.float().flatten().contiguous())
        layers[key] = layer
        if error is not None:
            errors[key] = error
    info = {"source": file, "imported": what, **_conversion_info(errors)}
    if config.get("base_model_name_or_path"):
        info["peft_base_model"] = config["base_model_name_or_path"]
    return Adapter(layers=layers, use_dora=any(x.magnitude is not None for x in layers.values()), info=info)


def _rank_of(parts: dict[str, torch.Tensor]) -> int:
    for kind in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if kind in parts:
            return int(parts[kind].shape[0])
    return 1


def _peft_key(module: str, base, file: str) -> str:
    """A peft module path → our key: already prefixed, else the UNet's (or a text encoder's) module of that path."""
    if module.split(".")[0] in PREFIXES:
        candidates = [module, module.replace(".text_model.", ".", 1)]
    else:
        candidates = [f"{c}.{module}" for c in PREFIXES] + [f"{c}.{module.removeprefix('text_model.')}"
                                                               for c in PREFIXES if c != "unet"]
    for key in candidates:
        component, _, path = key.partition(".")
        root = getattr(base.pipe, component, None)
        if root is not None and _has_module(root, path):
            return key
    raise ZipqError(f"{file}: layer {module} matches no layer of this base model ({base.describe()}): the adapter "
                    "was made for another model. Pass the base it was trained for with --base.")
