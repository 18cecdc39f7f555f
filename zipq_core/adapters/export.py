"""Files for other tools, each written so that tool's own math gives the studio's fused weights (DESIGN §8, §11).

One entry point, `export_adapter(adapter, base, fmt, out_file)`, for the CLI and the app. Every format is checked
as it is written: the tensors as stored (after the cast to the file's dtype) are put through the reader's weight
math and compared with the studio's fused weight of each layer (`layer_error`: at most 1 % of the layer's change).

The readers differ only on DoRA (a plain LoRA, ΔW = alpha / r · up @ down, is read alike by all of them):
- LyCORIS (and the studio, peft, diffusers' own folder): W = dora_scale · (W0 + ΔW) / ‖W0 + ΔW‖ per output row.
- ComfyUI and Forge, for a `dora_scale` of [out, 1]: W = dora_scale · (W0 + ΔW) / ‖W0‖, the norm of the
  *original* row. Solving dora_scale = m · ‖W0‖ / ‖W0 + ΔW‖ gives the studio's weight exactly, on this base only.
- A1111 normalises per input column, and sd-scripts' networks.lora and diffusers' kohya converter drop
  `dora_scale`: a DoRA cannot be written in their form, so its change W' − W0 is baked into a plain LoRA,
  each layer at the smallest rank that meets the bound (an SVD; the magnitude rescaling is not low rank).
Where both a solved DoRA and a baked LoRA meet the bound the smaller file is written. Solved and baked files
depend on the base weights: their metadata carries the base's name and a SHA-256 of its adapted weights.

Layers of different ranks or scales (a merge) are written with one alpha for the whole file and each layer's
scale folded into `lora_up`: every reader, diffusers' kohya converter included (one alpha, ranks per layer from
the shapes), then computes alpha / r per layer right.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ZipqError
from .apply import resolve_module
from .folder import METADATA_KEY, adapter_state_dict, header_info, lora_metadata, save_adapter
from .kohya import ARCHITECTURES, BASE_VERSIONS, DORA_CONVENTION_KEY, kohya_name
from .layer import Adapter, LoraLayer, fuse_weight, row_norm

# Format name → what reads it. The order is the order the app and the CLI offer them in.
FORMATS: dict[str, str] = {
    "comfyui": "ComfyUI: kohya names; a DoRA's dora_scale solved for ComfyUI's math on this base (exact here only)",
    "forge": "Forge: the ComfyUI file (Forge applies ComfyUI's DoRA math)",
    "a1111": "AUTOMATIC1111: kohya names, plain LoRA; a DoRA baked per layer to the rank the 1 % bound needs",
    "diffusers": "diffusers load_lora_weights: pytorch_lora_weights.safetensors, peft keys, DoRA kept as trained",
    "kohya": "kohya sd-scripts (networks.lora): plain LoRA; a DoRA baked like a1111",
    "lycoris": "LyCORIS (A1111/Forge/ComfyUI LyCORIS loaders): dora_scale [out, 1] over W0 + ΔW, as trained",
    "int8": "this studio's INT8 adapter folder (half the size of fp16; read only by the studio and its CLI)",
}
BOUND = 0.01  # the reader's weight may differ from the studio's by 1 % of the layer's change
TINY_CHANGE = 1e-4  # a change below this fraction of ‖W0‖ is judged in absolute terms:
TINY_ABS = 1e-6  # ‖W_reader − W_studio‖ ≤ 1e-6·‖W0‖
SVD_TARGET = 0.009  # truncation error aimed at when baking, leaving room for the file dtype's rounding
VERSION = "zipq-studio 0.1.0 export 1"

# How a reader turns one layer's tensors into a weight: "lora" (no dora_scale), "lycoris" (÷‖W0 + ΔW‖ per
# output row), "comfyui" (÷‖W0‖ per output row, ComfyUI/Forge for an output-axis dora_scale).
_DORA_CONVENTION = {"comfyui": "comfyui", "forge": "comfyui", "lycoris": "lycoris"}
_KOHYA_FORMATS = ("comfyui", "forge", "a1111", "kohya", "lycoris")


@dataclass
class ExportReport:
    """What an export wrote and how close each reader gets to the studio's weights."""

    path: Path
    format: str
    bytes: int
    layers: int
    max_relative_error: float  # worst `layer_error` over the layers, as the format's reader computes them
    ranks: dict[str, int] = field(default_factory=dict)  # rank written per layer, for layers baked into a LoRA
    note: str = ""
    base_sha256: str = ""  # set when the file is exact only on this base (solved or baked DoRA)

    @property
    def baked(self) -> bool:
        return bool(self.ranks)

    def as_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "bytes": self.bytes, "layers": self.layers,
                "max_relative_error": self.max_relative_error, "baked_layers": len(self.ranks),
                "baked_ranks": sorted(set(self.ranks.values())), "base_sha256": self.base_sha256, "note": self.note}


@dataclass
class _Written:
    """One layer as a kohya-style file holds it: ΔW = alpha / rank · up @ down, optional dora_scale [out].

    `down`, `up` and `dora_scale` are kept in fp32; `stored()` gives the factors as the file holds them."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    dora_scale: torch.Tensor | None = None
    convention: str = "lora"
    baked: bool = False
    factor_dtype: torch.dtype = torch.float32

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def numel(self) -> int:
        return self.down.numel() + self.up.numel() + (0 if self.dora_scale is None else self.dora_scale.numel())

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down.to(self.factor_dtype).contiguous(), self.up.to(self.factor_dtype).contiguous()


def layer_error(w_reader: torch.Tensor, w_studio: torch.Tensor, w0: torch.Tensor) -> float:
    """The issue's error of one layer, on a scale where 1 % (0.01) is the bound for every layer.

    ‖W_reader − W_studio‖ / ‖W_studio − W0‖; for a layer whose change is below 1e-4·‖W0‖ the bound is
    ‖W_reader − W_studio‖ ≤ 1e-6·‖W0‖ instead, reported as 0.01 · ‖W_reader − W_studio‖ / (1e-6·‖W0‖).
    """
    w0 = w0.float()
    diff = float((w_reader.float() - w_studio.float()).norm())
    change, n0 = float((w_studio.float() - w0).norm()), float(w0.norm())
    if change < TINY_CHANGE * n0:
        return BOUND * diff / max(TINY_ABS * n0, 1e-30)
    return diff / change


def reader_weight(w0: torch.Tensor, written: _Written) -> torch.Tensor:
    """The weight a reader computes from one layer's stored tensors, in fp32 (strength 1)."""
    w0 = w0.float()
    down, up = (t.float().flatten(1) for t in written.stored())
    calc = w0 + (written.alpha / written.rank * up @ down).view_as(w0)
    if written.dora_scale is None:
        return calc
    rows = lambda v: v.view(-1, *([1] * (w0.dim() - 1)))
    norm = (w0 if written.convention == "comfyui" else calc).flatten(1).norm(dim=1)
    return calc * rows(written.dora_scale.float() / (norm + torch.finfo(torch.float32).eps))


def base_fingerprint(base, keys) -> str:
    """SHA-256 of the adapted base weights (module names and fp32 values, in key order): what a solved or baked
    file is exact against."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        weight = resolve_module(base.pipe, key).weight.detach().float().cpu().contiguous()
        digest.update(key.encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def _check_request(fmt: str, out: Path) -> None:
    if fmt not in FORMATS:
        raise ZipqError(f"Unknown export format '{fmt}'. Choose one of: {', '.join(FORMATS)}.")
    if fmt == "int8" and out.suffix:
        raise ZipqError(f"The int8 format writes an adapter folder; give a folder name, not {out.name}.")
    if fmt != "int8" and out.suffix != ".safetensors":
        raise ZipqError(f"Export to a .safetensors file name (got '{out.name}'); e.g. --out my_lora.safetensors.")


def export_adapter(adapter: Adapter, base, fmt: str, out_file: str | Path, *, bake: bool = False,
                   dtype: torch.dtype = torch.float16) -> ExportReport:
    """Write `adapter` in the format one tool reads exactly, and measure that tool's error.

    Args:
        adapter: the adapter (trained, merged, imported or dequantized INT8).
        base: the `BaseModel` it was trained on (its weights: the reference, the solved scales, the hash).
        fmt: a name of `FORMATS`.
        out_file: a .safetensors file (a folder for "int8").
        bake: write DoRA layers as plain LoRA even where the reader has a DoRA convention (comfyui, lycoris).
        dtype: dtype of the low-rank factors in the file; DoRA scales and magnitudes are always fp32 (their
            rounding in fp16 alone is several % of a typical change), and a layer that misses the bound in
            `dtype` is written in fp32.

    Returns:
        An `ExportReport`: path, bytes, the reader's worst layer error, baked ranks and a note.
    """
    out = Path(out_file)
    _check_request(fmt, out)
    if not adapter.layers:
        raise ZipqError("The adapter has no layers to export.")
    if fmt == "int8":
        return _export_int8(adapter, base, out)
    if fmt == "diffusers":
        return _export_diffusers(adapter, base, out, dtype)
    written, w0s, targets = {}, {}, {}
    for key, layer in sorted(adapter.layers.items()):
        w0s[key] = resolve_module(base.pipe, key).weight.detach().float().cpu()
        targets[key] = fuse_weight(w0s[key], [(layer, 1.0)])
        written[key] = _encode(layer, w0s[key], targets[key], fmt, bake, dtype)
    errors = _one_alpha(written, w0s, targets)
    dependent = any(w.baked or w.convention == "comfyui" for w in written.values())
    fingerprint = base_fingerprint(base, adapter.layers) if dependent else ""
    tensors = _kohya_tensors(written, base.arch)
    meta = _metadata(adapter, base, fmt, written, fingerprint)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    ranks = {key: w.rank for key, w in written.items() if w.baked}
    return ExportReport(out, fmt, out.stat().st_size, len(written), max(errors.values()), ranks,
                        _note(fmt, ranks, fingerprint, adapter.use_dora), fingerprint)


def _encode(layer: LoraLayer, w0: torch.Tensor, target: torch.Tensor, fmt: str, bake: bool,
            dtype: torch.dtype) -> _Written:
    """The smallest encoding of one layer that the format's reader computes within the bound (`target`: the studio's
    fused weight)."""
    down, up = layer.down.float(), layer.up.float()
    if layer.magnitude is None:
        best = _fit_dtype(_Written(down, up, layer.scale * layer.rank), w0, target, dtype)
    elif fmt in _DORA_CONVENTION and not bake:
        # The DoRA as written (LyCORIS) or solved (ComfyUI) holds r·(in + out) + out numbers; a baked LoRA is
        # smaller only at a rank below the trained one, which SVD of W' − W0 would need for every layer (minutes
        # at SDXL scale), so it is baked only where the DoRA form misses the bound.
        best = _fit_dtype(_dora(layer, w0, _DORA_CONVENTION[fmt]), w0, target, dtype)
        if best[1] > BOUND:
            best = _bake(w0, target, dtype)
    else:
        best = _bake(w0, target, dtype)
    if best[1] > BOUND:  # a plain LoRA that misses the bound even in fp32: non-finite or enormous values
        raise ZipqError("A layer cannot be written within 1 % even in fp32; the adapter holds non-finite or "
                        "huge values. Retrain with a lower learning rate.")
    return best[0]


def _dora(layer: LoraLayer, w0: torch.Tensor, convention: str) -> _Written:
    """The DoRA layer with its dora_scale: m itself (LyCORIS), or m·‖W0‖/‖W0 + ΔW‖ (ComfyUI/Forge divide by ‖W0‖)."""
    scale = layer.magnitude.float().flatten()
    if convention == "comfyui":
        calc = w0 + layer.delta()
        scale = scale * w0.flatten(1).norm(dim=1) / calc.flatten(1).norm(dim=1)
    return _Written(layer.down.float(), layer.up.float(), layer.scale * layer.rank, scale, convention)


def _fit_dtype(written: _Written, w0: torch.Tensor, target: torch.Tensor, dtype: torch.dtype
               ) -> tuple[_Written, float]:
    """The layer with its factors stored in `dtype` (scales fp32), or in fp32 when `dtype` misses the bound."""
    error = float("inf")
    for factor_dtype in dict.fromkeys((dtype, torch.float32)):
        written.factor_dtype = factor_dtype
        error = layer_error(reader_weight(w0, written), target, w0)
        if error <= BOUND:
            break
    return written, error


def _bake(w0: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> tuple[_Written, float]:
    """W' − W0 as a plain LoRA at the smallest rank whose reader weight meets the bound (an SVD)."""
    change = (target - w0).flatten(1)
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    energy = s.square().flip(0).cumsum(0).flip(0)  # energy[r] = Σ_{i ≥ r} s_i²: the error² at rank r
    total = float(energy[0]) if len(energy) else 0.0
    rank = 1
    while rank < len(s) and float(energy[rank]) > (SVD_TARGET**2) * total:
        rank += 1
    error = float("inf")
    while True:
        root = s[:rank].sqrt()
        up = (u[:, :rank] * root).view(w0.shape[0], rank, *([1] * (w0.dim() - 2)))
        down = (vh[:rank] * root[:, None]).reshape(rank, *w0.shape[1:])
        written, error = _fit_dtype(_Written(down, up, float(rank), baked=True), w0, target, dtype)
        if error <= BOUND or rank >= len(s):
            return written, error
        rank = min(len(s), rank + max(1, rank // 4))


def _one_alpha(written: dict[str, _Written], w0s: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
               ) -> dict[str, float]:
    """Give the file one alpha: each layer's alpha / rank folded into its `lora_up`, so every reader (diffusers'
    kohya converter takes one alpha and the ranks from the shapes) scales every layer right. Returns each layer's
    error as stored after the fold."""
    alpha = collections.Counter(w.alpha for w in written.values()).most_common(1)[0][0]
    errors = {}
    for key, w in written.items():
        if w.alpha != alpha:
            w.up, w.alpha = w.up * (w.alpha / alpha), alpha
        errors[key] = _fit_dtype(w, w0s[key], targets[key], w.factor_dtype)[1]
    return errors


def _kohya_tensors(written: dict[str, _Written], arch: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, w in written.items():
        name = kohya_name(key, arch)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = w.stored()
        tensors[f"{name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        if w.dora_scale is not None:
            shape = (-1, 1, 1, 1) if w.down.dim() == 4 else (-1, 1)
            tensors[f"{name}.dora_scale"] = w.dora_scale.float().view(shape).contiguous()
    return tensors


def trigger_words(info: dict) -> dict[str, str]:
    """The token and class noun of a trained adapter, or of a merge's subject and style."""
    words = {k: str(info[k]) for k in ("token", "class_noun", "instance_prompt") if info.get(k)}
    for part in ("subject", "style"):
        if isinstance(info.get(part), dict) and info[part].get("token"):
            words[f"{part}_token"] = str(info[part]["token"])
            if info[part].get("class_noun"):
                words[f"{part}_class_noun"] = str(info[part]["class_noun"])
    return words


def _trigger_phrase(words: dict[str, str]) -> str:
    token = words.get("token") or words.get("subject_token", "")
    noun = words.get("class_noun") or words.get("subject_class_noun", "")
    style = words.get("style_token", "")
    return " ".join(x for x in (token, noun, f"in {style} style" if style else "") if x)


def _common_metadata(adapter: Adapter, base, fmt: str, fingerprint: str) -> dict[str, str]:
    words = trigger_words(adapter.info)
    phrase = _trigger_phrase(words)
    size = base.default_size
    meta = {
        "zipq.format": fmt,
        "zipq.version": VERSION,
        "zipq.base": str(base.spec),
        "zipq.trigger": json.dumps(words, sort_keys=True),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{ARCHITECTURES[base.arch]}/lora",
        "modelspec.title": adapter.name,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.trigger_phrase": phrase,
        # A1111's and kohya's UIs show trigger tags from ss_tag_frequency: {dataset: {tag: count}}.
        "ss_tag_frequency": json.dumps({adapter.name: {phrase: 1}} if phrase else {}),
    }
    if fingerprint:
        meta["zipq.base_sha256"] = fingerprint
        meta["zipq.base_note"] = (f"solved/baked against {base.spec}: exact on that base only (SHA-256 of its "
                                  "adapted weights above)")
    if adapter.info.get("kind") == "merged":
        meta["modelspec.merged_from"] = json.dumps([words.get("subject_token"), words.get("style_token")])
    return meta


def _metadata(adapter: Adapter, base, fmt: str, written: dict[str, _Written], fingerprint: str) -> dict[str, str]:
    dora = any(w.dora_scale is not None for w in written.values())
    rank = collections.Counter(w.rank for w in written.values()).most_common(1)[0][0]
    args = {"algo": "lora", "dora_wd": "True", "wd_on_out": "True"} if dora else {}
    extra = {}
    if any(w.convention == "comfyui" for w in written.values()):
        # import_kohya reads this back into the studio's magnitude (m = dora_scale·‖W0 + ΔW‖ / ‖W0‖)
        extra[DORA_CONVENTION_KEY] = "comfyui"
    return {
        **_common_metadata(adapter, base, fmt, fingerprint),
        **extra,
        "ss_base_model_version": BASE_VERSIONS[base.arch],
        "ss_network_module": "lycoris.kohya" if dora else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(next(iter(written.values())).alpha),
        "ss_network_args": json.dumps(args),
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
    }


def _note(fmt: str, ranks: dict[str, int], fingerprint: str, dora: bool) -> str:
    parts = [FORMATS[fmt]]
    if ranks:
        parts.append(f"{len(ranks)} DoRA layers baked into plain LoRA at ranks {min(ranks.values())}–"
                     f"{max(ranks.values())}")
    if fingerprint:
        parts.append("exact only on the base it was exported against (name and SHA-256 in the metadata)")
    if dora:
        parts.append("another tool's strength 0.5 is not the studio's slider at 0.5 for a DoRA")
    return "; ".join(parts)


def _export_diffusers(adapter: Adapter, base, out: Path, dtype: torch.dtype) -> ExportReport:
    """diffusers' `load_lora_weights` file (the folder writer's keys and metadata), factors in `dtype` unless that
    misses the bound, magnitudes fp32; its error measured with the studio's (= peft's) math on the stored values.

    peft gives every layer of a DoRA adapter a magnitude: a merge's plain-LoRA layers (beside DoRA ones) would load
    with none (diffusers fails on them). They get m = ‖W0 + ΔW‖, with which DoRA's weight is W0 + ΔW exactly, on
    this base: the file then records it."""
    original = adapter
    filled = adapter.use_dora and any(x.magnitude is None for x in adapter.layers.values())
    if filled:
        adapter = _with_magnitudes(adapter, base)
    worst, chosen = 0.0, dtype
    for chosen in dict.fromkeys((dtype, torch.float32)):
        tensors = adapter_state_dict(adapter, chosen)
        fp32 = adapter_state_dict(adapter, torch.float32)
        for key in [k for k in tensors if k.endswith(".lora_magnitude_vector")]:
            tensors[key] = fp32[key]
        stored = _stored_adapter(adapter, tensors)
        worst = max(_studio_error(base, key, layer, stored.layers[key]) for key, layer in original.layers.items())
        if worst <= BOUND:
            break
    meta = {"format": "pt", METADATA_KEY: json.dumps(lora_metadata(adapter), sort_keys=True),
            "zipq.info": header_info(adapter.info)}
    fingerprint = base_fingerprint(base, adapter.layers) if filled else ""
    meta.update(_common_metadata(adapter, base, "diffusers", fingerprint))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    note = FORMATS["diffusers"] + ("" if chosen == dtype else "; factors in fp32 (fp16 missed the 1 % bound)")
    if filled:
        note += "; plain-LoRA layers given DoRA magnitudes ‖W0 + ΔW‖: exact only on the base it was exported against"
    return ExportReport(out, "diffusers", out.stat().st_size, len(adapter.layers), worst, {}, note, fingerprint)


def _with_magnitudes(adapter: Adapter, base) -> Adapter:
    layers = {}
    for key, layer in adapter.layers.items():
        if layer.magnitude is None:
            w0 = resolve_module(base.pipe, key).weight.detach().float().cpu()
            layer = LoraLayer(layer.down, layer.up, layer.scale, row_norm(w0 + layer.delta()))
        layers[key] = layer
    return Adapter(layers, True, adapter.info)


def _stored_adapter(adapter: Adapter, tensors: dict[str, torch.Tensor]) -> Adapter:
    layers = {}
    for key, layer in adapter.layers.items():
        magnitude = tensors.get(f"{key}.lora_magnitude_vector")
        layers[key] = LoraLayer(tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], layer.scale,
                                None if magnitude is None else magnitude.float().flatten())
    return Adapter(layers, adapter.use_dora, adapter.info)


def _studio_error(base, key: str, reference: LoraLayer, stored: LoraLayer) -> float:
    w0 = resolve_module(base.pipe, key).weight.detach().float().cpu()
    return layer_error(fuse_weight(w0, [(stored, 1.0)]), fuse_weight(w0, [(reference, 1.0)]), w0)


def _export_int8(adapter: Adapter, base, out: Path) -> ExportReport:
    """The studio's INT8 folder; its error is the quantization's, measured after reading it back."""
    from .folder import load_adapter

    path = save_adapter(adapter, out, storage="int8")
    back = load_adapter(out)
    worst = max(_studio_error(base, key, layer, back.layers[key]) for key, layer in adapter.layers.items())
    return ExportReport(path, "int8", path.stat().st_size, len(adapter.layers), worst, {}, FORMATS["int8"])
