"""QDoRA: train DoRA (or LoRA) on a frozen UNet whose linear layers are quantized with bitsandbytes.

The same code runs on CUDA and on CPU: the UNet's `nn.Linear` layers are swapped for
`bnb.nn.Linear8bitLt` (int8, per-row scales) or `bnb.nn.Linear4bit` (NF4) in place, each of which
quantizes itself when moved to its device, and peft attaches its bnb-aware LoRA/DoRA layers to them.
(diffusers' `BitsAndBytesConfig` would be the loading-time route on CUDA, but it refuses CPU.)

Workarounds for the pinned versions (bitsandbytes 0.50.2, peft 0.21.2), all in this one file, each
checked by a test in tests/test_qdora.py that says when it can go:
1. peft only dispatches to its bnb layers when the model says `is_loaded_in_8bit` / `is_loaded_in_4bit`
   (hand-built bnb layers are otherwise treated as plain Linear): we set the flag on the UNet. This is peft's
   design (it expects models loaded quantized by transformers/diffusers), not a filed bug.
2. DoRA on an 8-bit layer fails on CPU at the second step: peft's `dequantize_module_weight` ends with
   `module.weight = module.weight.to(device)`, and bnb's `Int8Params.to()` drops the scales (`SCB`).
   `_dequantize_keeping_scales` dequantizes with `state=module.state` and leaves the weight alone.
   Upstream, related: bitsandbytes-foundation/bitsandbytes#1332 (an 8-bit layer's `.to()` ignores its
   state) and huggingface/peft#3418 (8-bit dequantization on the DoRA path, device of `SCB`).
DESIGN §5 also reports a 4-bit repack trap on avx512_bf16 CPUs (no-grad forward, < 64 inputs; upstream,
related: bitsandbytes-foundation/bitsandbytes#2078, `Params4bit.to()` and the CPU packing). With
requirements.txt's set (no optional `kernels` package) it does not occur on this avx512_bf16 machine:
tests/test_qdora.py keeps a test that fails if it appears, rather than a workaround for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from ..base import free_device_memory
from ..errors import ZipqError

Mode = Literal["int8", "nf4"]


def _require_bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # an import failure of bnb's native library is not a user error we can fix here
        raise ZipqError(f"QDoRA needs bitsandbytes, which failed to import ({e}): pip install bitsandbytes.") from e
    return bnb


def _quantized_linear(linear: torch.nn.Linear, mode: Mode, device: torch.device,
                      compute_dtype: torch.dtype) -> torch.nn.Module:
    """A bnb replacement of `linear` holding the same weights, quantized on `device`. Only this one layer's weight
    passes through host memory in fp32 (bnb quantizes from a float host tensor while moving it to the device)."""
    bnb = _require_bnb()
    has_bias = linear.bias is not None
    weight = linear.weight.data.float().cpu()
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=0.0)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, quant_type="nf4",
                              compute_dtype=compute_dtype)
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        q.bias = torch.nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return q.to(device)  # bnb quantizes while moving to the device


def quantize_linears(module: torch.nn.Module, mode: Mode, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Swap every nn.Linear inside `module` for its bnb version, in place, one layer at a time (the float layer
    is dropped as soon as its quantized copy exists).

    Returns:
        The number of layers quantized.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, _quantized_linear(child, mode, device, compute_dtype))
            del child
            count += 1
        else:
            count += quantize_linears(child, mode, device, compute_dtype)
    return count


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized weights count at their storage size)."""
    tensors = list(module.parameters()) + list(module.buffers())
    total = sum(t.numel() * t.element_size() for t in tensors)
    for m in module.modules():  # 4-bit scales live in quant_state, outside parameters
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def _dequantize_keeping_scales(module: torch.nn.Module) -> torch.Tensor:
    """peft's dequantize_module_weight without the CPU `.to(device)` that drops Int8Params.SCB (workaround 2)."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = module.weight
    if weight.__class__.__name__ not in ("Params4bit", "Int8Params"):
        return weight
    return dequantize_bnb_weight(weight, state=getattr(module, "state", None))


PEFT_MODULES_USING_DEQUANTIZE = ("peft.tuners.lora.dora", "peft.tuners.lora.layer", "peft.tuners.lora.variants")


@contextmanager
def patched_peft_dequantize() -> Iterator[None]:
    """Workaround 2, applied only while QDoRA trains and restored afterwards."""
    import importlib

    modules = [importlib.import_module(name) for name in PEFT_MODULES_USING_DEQUANTIZE]
    saved = [m.dequantize_module_weight for m in modules]
    try:
        for m in modules:
            m.dequantize_module_weight = _dequantize_keeping_scales
        yield
    finally:
        for m, original in zip(modules, saved):
            m.dequantize_module_weight = original


def quantize_unet(unet: torch.nn.Module, mode: Mode, device: torch.device) -> torch.nn.Module:
    """Quantize the UNet's linear layers in place (convolutions and norms stay in its float dtype) and flag it for
    peft's bnb layers. Returns the same module."""
    if mode not in ("int8", "nf4"):
        raise ZipqError(f"quantize_base must be 'int8' or 'nf4', not {mode!r}.")
    compute_dtype = next(p.dtype for p in unet.parameters() if p.is_floating_point())
    n = quantize_linears(unet, mode, device, compute_dtype)
    if n == 0:
        raise ZipqError("The UNet has no linear layers to quantize.")
    unet.requires_grad_(False)
    # Workaround 1: peft reads these flags to choose its bnb LoRA/DoRA layers.
    unet.is_loaded_in_8bit = mode == "int8"
    unet.is_loaded_in_4bit = mode == "nf4"
    return unet


@contextmanager
def quantized_unet(base, mode: Mode) -> Iterator[torch.nn.Module]:
    """Quantize the base's UNet in place for QDoRA training (with the peft workaround active), then load the float
    UNet again from disk.

    Why in place and reloaded: a quantized copy beside the float UNet (or a float copy on the host) would cost
    more memory than the quantization saves; reloading costs a few seconds of disk reads, and the later stages
    (merging, generating) want the float weights the adapter is applied to in every other tool. There are never
    two full UNets at once. The adapter trained on the quantized base has the usual float factors.
    """
    unet = quantize_unet(base.pipe.unet, mode, base.device)
    free_device_memory()  # the float weights just replaced
    try:
        with patched_peft_dequantize():
            yield unet
    finally:
        base.pipe.unet = None
        for name, _ in list(unet.named_children()):  # free its weights now, whoever still holds the module
            delattr(unet, name)
        del unet
        base.reload_unet()
