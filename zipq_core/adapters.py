"""Adapters in memory and on disk, and the strength semantics of DESIGN §6.

An `Adapter` is a set of low-rank layers keyed by their full module path ("unet.down_blocks.1…to_q").
Every other stage (train, merge, generate, export) speaks this one representation.

On disk an adapter is a folder:
    pytorch_lora_weights.safetensors   peft-style keys `unet.<module>.lora_A.weight` [r, in],
                                        `.lora_B.weight` [out, r], DoRA `.lora_magnitude_vector` [out]
                                        plus the `lora_adapter_metadata` that diffusers reads (r, lora_alpha,
                                        use_dora, target_modules); without it diffusers assumes alpha = r.
    adapter.json                        the sidecar: base model, kind, token, prompts, config, loss curve, timings.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import check_strength
from .errors import ZipqError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SIDECAR_NAME = "adapter.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # what peft's save_pretrained writes


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


def _group_by_module(adapters: Sequence[tuple[Adapter, float]]) -> dict[str, list[tuple[LoraLayer, float]]]:
    grouped: dict[str, list[tuple[LoraLayer, float]]] = collections.defaultdict(list)
    for adapter, strength in adapters:
        strength = check_strength(strength)
        if strength == 0:
            continue  # strength 0 touches nothing: the base weights stay bit for bit
        for key, layer in adapter.layers.items():
            grouped[key].append((layer, strength))
    return grouped


def resolve_module(pipe, key: str) -> torch.nn.Module:
    """'unet.down_blocks.0…to_q' → the module in the pipeline, with a clear error for foreign adapters."""
    component, _, path = key.partition(".")
    root = getattr(pipe, component, None)
    if root is None:
        raise ZipqError(f"The adapter targets '{component}', which this base model does not have: "
                        "was it trained for another architecture (SD1.5 vs SDXL)?")
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise ZipqError(f"The adapter's layer {key} does not exist in this base model: it was made for "
                        "another model or architecture.") from e


@contextmanager
def applied(pipe, adapters: Sequence[tuple[Adapter, float]]) -> Iterator[int]:
    """Fuse adapters at their strengths into the pipeline's weights, and restore them on exit.

    Fusing costs one weight write per adapted layer and makes generation as fast as the base model;
    the original tensors are kept (not recomputed) so leaving the block restores them bit for bit.

    Yields:
        The number of layers changed.
    """
    with applied_phases(pipe, [adapters]) as phases:
        yield len(phases.keys)


class Phases:
    """Several settings of adapter strengths over one set of layers; `select(i)` fuses setting i in place.

    Only the active setting's weights exist at a time (fused when selected), so a two-phase generation
    needs no more memory than a one-phase one; selecting the active phase again costs nothing.
    """

    def __init__(self, pipe, phases: Sequence[Sequence[tuple[Adapter, float]]]):
        self.groups = [_group_by_module(p) for p in phases]
        self.keys = sorted(set().union(*self.groups))
        self.modules = {k: resolve_module(pipe, k) for k in self.keys}
        self.originals = {k: m.weight.data for k, m in self.modules.items()}
        self.active: int | None = None

    def select(self, index: int) -> None:
        if index == self.active:
            return
        group = self.groups[index]
        for key in self.keys:
            weight = self.originals[key]
            if key in group:
                weight = _checked_fuse(key, weight, group[key])
            self.modules[key].weight.data = weight
        self.active = index

    def restore(self) -> None:
        for key, tensor in self.originals.items():
            self.modules[key].weight.data = tensor
        self.active = None


def _checked_fuse(key: str, w0: torch.Tensor, parts: list[tuple[LoraLayer, float]]) -> torch.Tensor:
    fused = fuse_weight(w0, parts)
    if fused.shape != w0.shape:
        raise ZipqError(f"The adapter's layer {key} has shape {tuple(fused.shape)} but the base model's "
                        f"is {tuple(w0.shape)}: it was made for another model.")
    if not torch.isfinite(fused).all():
        raise ZipqError(f"Applying the adapters gave non-finite weights in {key}: lower the strengths.")
    return fused.to(w0.dtype)


@contextmanager
def applied_phases(pipe, phases: Sequence[Sequence[tuple[Adapter, float]]]) -> Iterator[Phases]:
    """Like `applied` for several strength settings of the same adapters; phase 0 is active on entry.

    The caller switches with `phases.select(i)` (generate does so by timestep); on exit the base weights
    are restored bit for bit whatever phase was active.
    """
    state = Phases(pipe, phases)
    try:
        state.select(0)
        yield state
    finally:
        state.restore()


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------

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


def save_adapter(adapter: Adapter, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the adapter folder (weights with diffusers' metadata + JSON sidecar).

    Args:
        adapter: what to save.
        out_dir: folder, created if needed.
        dtype: tensor dtype in the file (fp16 halves the size; fp32 keeps training exactness).

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
    metadata = {"format": "pt", METADATA_KEY: json.dumps(lora_metadata(adapter), sort_keys=True),
                "zipq.info": header_info(adapter.info)}
    path = out / WEIGHTS_NAME
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # never leave a half-written adapter where a loader would find it
    (out / SIDECAR_NAME).write_text(json.dumps(adapter.info, indent=2, sort_keys=True, default=str))
    return path


def find_weights_file(source: str | Path) -> Path:
    """An adapter folder or file → the safetensors file to read."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in (WEIGHTS_NAME, PEFT_WEIGHTS_NAME):
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
    from .quantize import dequantize_state_dict  # INT8 adapters dequantize on load

    tensors = dequantize_state_dict(tensors, header)
    config = json.loads(header.get(METADATA_KEY, "{}") or "{}")
    info = json.loads(header.get("zipq.info", "{}") or "{}")
    sidecar = path.parent / SIDECAR_NAME
    if sidecar.exists() and path.name == WEIGHTS_NAME:
        info = json.loads(sidecar.read_text())
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in tensors):
        raise ZipqError(f"{path.name} is a kohya/A1111 file: convert it with `python -m zipq_core export` "
                        "or load it through the merge tab's import (kohya import).")
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
