"""INT8 storage of adapters: pure packing and unpacking of a state dict (adapters.folder writes the file).

INT8 adapter format: each LoRA factor is stored as int8 with one fp16 scale per rank component
(rows of lora_A [r, in], columns of lora_B [out, r]), packed into three 1-D tensors (int8 data, fp16
scales, fp16 other tensors) described by the header's `zipq.int8.layout`; the header carries
`zipq.int8 = "1"`. DoRA magnitudes stay fp16: m sits near ‖W0‖ and the learned change m − ‖W0‖ is
small, so an 8-bit grid over m would erase it. Dequantization happens on load, so every stage sees floats.

Error bound: symmetric rounding to a grid of step s = max|row| / 127 puts every element within s / 2
(plus fp16 rounding of the scale) of its float value.
"""

from __future__ import annotations

import json
import math

import torch

INT8_FLAG = "zipq.int8"


def _component_axis(key: str) -> int:
    """The axis along which one rank component lies: lora_A rows (dim 0), lora_B columns (dim 1)."""
    return 1 if ".lora_B." in key or key.endswith(".lora_up.weight") else 0


def quantize_int8(tensor: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-component INT8.

    Args:
        tensor: a LoRA factor, e.g. lora_A [r, in] (axis 0) or lora_B [out, r] (axis 1); conv factors too.
        axis: the rank axis; one scale per index along it.

    Returns:
        (int8 tensor of the same shape, fp16 scales [r]).
    """
    t = tensor.float().movedim(axis, 0)  # [r, …]
    amax = t.flatten(1).abs().amax(dim=1)  # [r]
    scale = (amax / 127.0).clamp_min(1e-12).half()
    q = torch.round(t / scale.float().view(-1, *([1] * (t.dim() - 1)))).clamp_(-127, 127).to(torch.int8)
    return q.movedim(0, axis).contiguous(), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    t = q.float().movedim(axis, 0)
    return (t * scale.float().view(-1, *([1] * (t.dim() - 1)))).movedim(0, axis).contiguous()


def int8_error_bound(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """Max abs error allowed per element by the format: half a grid step, plus the fp16 scale rounding."""
    t = tensor.float().movedim(axis, 0)
    amax = t.flatten(1).abs().amax(dim=1)
    step = amax / 127.0
    bound = step / 2 + amax * 2.0**-10  # |x|/scale ≤ 127 and the fp16 scale is within 2^-11 relative
    return bound.view(-1, *([1] * (t.dim() - 1))).expand_as(t).movedim(0, axis)


LAYOUT_KEY = "zipq.int8.layout"
PACKED = ("zipq.int8.data", "zipq.int8.scales", "zipq.fp16.data")


_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


def quantize_state_dict(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Pack an adapter's tensors: LoRA factors → one int8 blob + one fp16 scale vector, magnitudes → fp16 blob.

    Packing (instead of one safetensors entry per factor) keeps the header small: on a small model the
    ~130-byte header entry of each tensor would otherwise cost as much as the data saved.

    Returns:
        (the three packed 1-D tensors, the JSON layout [[module, A shape, B shape, magnitude shape or []], …]).
    """
    int8, scales, fp16, layout = [], [], [], []
    modules = sorted({k[: -len(sfx)] for k in tensors for sfx in _SUFFIXES if k.endswith(sfx)})
    for module in modules:
        shapes = []
        for suffix in _SUFFIXES[:2]:
            key = module + suffix
            q, scale = quantize_int8(tensors[key], _component_axis(key))
            int8.append(q.flatten())
            scales.append(scale)
            shapes.append(list(q.shape))
        magnitude = tensors.get(module + _SUFFIXES[2])
        if magnitude is not None:
            fp16.append(magnitude.half().flatten())
        layout.append([module, *shapes, [] if magnitude is None else list(magnitude.shape)])
    cat = lambda parts, dtype: torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
    packed = dict(zip(PACKED, (cat(int8, torch.int8), cat(scales, torch.float16), cat(fp16, torch.float16))))
    return packed, json.dumps(layout, separators=(",", ":"))


def dequantize_state_dict(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, torch.Tensor]:
    """Inverse of `quantize_state_dict` when the header flags INT8; float files pass through untouched."""
    if header.get(INT8_FLAG) != "1":
        return tensors
    offsets = {name: 0 for name in PACKED}
    out: dict[str, torch.Tensor] = {}
    for module, a_shape, b_shape, m_shape in json.loads(header[LAYOUT_KEY]):
        for suffix, shape in zip(_SUFFIXES[:2], (a_shape, b_shape)):
            key = module + suffix
            axis = _component_axis(key)
            q = _take(tensors, offsets, PACKED[0], math.prod(shape)).view(shape)
            out[key] = dequantize_int8(q, _take(tensors, offsets, PACKED[1], shape[axis]), axis)
        if m_shape:
            out[module + _SUFFIXES[2]] = _take(tensors, offsets, PACKED[2], math.prod(m_shape)).view(m_shape).float()
    return out


def _take(tensors: dict[str, torch.Tensor], offsets: dict[str, int], name: str, count: int) -> torch.Tensor:
    start = offsets[name]
    offsets[name] = start + count
    return tensors[name][start : start + count]
