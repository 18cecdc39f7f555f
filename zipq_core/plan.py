"""What a job will cost before it runs, in device-seconds: the budgets of a shared server (jobs.Limits) and the
estimates a visitor sees come from here.

The cost of a UNet (or VAE decoder) pass is counted, not guessed: the model is built from its config on PyTorch's
`meta` device (no memory, no compute) and run under `FlopCounterMode`, which counts the multiply-adds of every
convolution, projection and attention product at the exact size asked for (attention grows with the square of the
pixels, so a 2048 px request on a 64 px model is ~14,000× one at 64 px, not 1,000×). One timed pass at the
model's native size on the real device turns FLOPs into seconds (`Speed`). Each stage's estimate is then
passes × FLOPs per pass / throughput:
- training: per step, batch × (2 with prior preservation) samples, forward + backward ≈ 3 forwards;
- merging (learned): per step and concept, batch × (1 teacher forward + 1 merged forward and backward);
- generating: rounds (candidates) × steps × images × 2 (classifier-free guidance) forwards, a VAE decode per
  image and round, and the judges' 2 × levels × noises forwards per candidate.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch

from .config import GenerateConfig, MergeConfig, TrainConfig

_FLOPS: dict[tuple, float] = {}
_FLOPS_LOCK = threading.Lock()
JUDGE_PASSES = 2 * 4 * 2  # base and adapter × levels × noises (generation.rerank.evidence's defaults)
TRAIN_PASSES = 3.0  # a forward and a backward (≈ 2 forwards) per sample
SETUP_S = 2.0  # encoding images and prompts, attaching the adapter


def _config_key(config) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in dict(config).items()))


def _count(kind: str, config, height: int, width: int) -> float:
    """FLOPs of one pass at batch 1, counted on the meta device; cached per (model config, size)."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (kind, _config_key(config), height, width)
    with _FLOPS_LOCK:
        if key in _FLOPS:
            return _FLOPS[key]
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        if kind == "unet":
            model = UNet2DConditionModel.from_config(config)
            x = torch.zeros(1, model.config.in_channels, height, width)
            text = torch.zeros(1, 77, model.config.cross_attention_dim)
            added = None
            if model.config.addition_embed_type == "text_time":
                pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
                added = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
            with FlopCounterMode(display=False) as counter:
                model(x, torch.zeros(1), encoder_hidden_states=text, added_cond_kwargs=added)
        else:
            model = AutoencoderKL.from_config(config)
            z = torch.zeros(1, model.config.latent_channels, height, width)
            with FlopCounterMode(display=False) as counter:
                model.decode(z)
    flops = float(counter.get_total_flops())
    with _FLOPS_LOCK:
        _FLOPS[key] = flops
    return flops


def unet_flops(base, width_px: int, height_px: int) -> float:
    """FLOPs of one UNet forward at batch 1 for an image of width × height pixels."""
    f = base.pipe.vae_scale_factor
    return _count("unet", base.pipe.unet.config, height_px // f, width_px // f)


def decode_flops(base, width_px: int, height_px: int) -> float:
    """FLOPs of one VAE decode at batch 1."""
    f = base.pipe.vae_scale_factor
    return _count("vae", base.pipe.vae.config, height_px // f, width_px // f)


@dataclass(frozen=True)
class Speed:
    """This device's measured throughput on this base (FLOP/s of a UNet forward at the native size)."""

    flops_per_second: float

    def seconds(self, flops: float) -> float:
        return flops / self.flops_per_second


def measure_speed(base, repeats: int = 2) -> Speed:
    """Time UNet forwards at the base's native size (after one warm-up) and return the throughput."""
    from .encode import encode_text, unet_forward

    size = base.default_size
    f = base.pipe.vae_scale_factor
    cond = encode_text(base, [""], size)
    x = torch.zeros(1, base.unet.config.in_channels, size // f, size // f, device=base.device, dtype=base.dtype)
    t = torch.full((1,), 500, device=base.device)
    with base.lock, torch.inference_mode():
        unet_forward(base.unet, x, t, cond)
        best = math.inf
        for _ in range(repeats):
            if base.device.type == "cuda":
                torch.cuda.synchronize(base.device)
            started = time.perf_counter()
            unet_forward(base.unet, x, t, cond)
            if base.device.type == "cuda":
                torch.cuda.synchronize(base.device)
            best = min(best, time.perf_counter() - started)
    return Speed(unet_flops(base, size, size) / max(best, 1e-6))


def train_seconds(base, cfg: TrainConfig, speed: Speed) -> float:
    """Estimated seconds of a training (from step 0) on this device."""
    samples = cfg.batch_size * (2 if cfg.prior_preservation else 1)
    step = samples * TRAIN_PASSES * unet_flops(base, cfg.resolution, cfg.resolution)
    prior = cfg.num_class_images * 20 * 2 * unet_flops(base, cfg.resolution, cfg.resolution) \
        if cfg.prior_preservation else 0.0
    return SETUP_S + speed.seconds(cfg.steps * step + prior)


def merge_seconds(base, cfg: MergeConfig, speed: Speed) -> float:
    """Estimated seconds of a merge (training-free methods: a few seconds of tensor work)."""
    if not cfg.learned:
        return SETUP_S
    size = base.default_size
    per_step = 2 * cfg.batch_size * (1 + TRAIN_PASSES) * unet_flops(base, size, size)
    return SETUP_S + speed.seconds(cfg.steps * per_step)


def generate_seconds(base, cfg: GenerateConfig, adapters: int, speed: Speed) -> float:
    """Estimated seconds of a generation request with `adapters` active adapters (their judges pick candidates)."""
    rounds = cfg.candidates if adapters else 1
    guided = 2 if cfg.guidance > 1 else 1
    denoise = rounds * cfg.steps * cfg.num_images * guided * unet_flops(base, cfg.width, cfg.height)
    decode = rounds * cfg.num_images * decode_flops(base, cfg.width, cfg.height)
    judges = adapters * rounds * cfg.num_images * JUDGE_PASSES * unet_flops(base, cfg.width, cfg.height) \
        if rounds > 1 else 0.0
    return speed.seconds(denoise + decode + judges)


def describe(seconds: float) -> str:
    """'12 s', '4.5 min', '1.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
