"""Text and image encoding done once, and the UNet call that training and merging share.

With the text encoders and the VAE frozen, each prompt and each image is encoded once; the training
and merge loops then cost one UNet pass per step (DESIGN §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .base import BaseModel


@dataclass
class Conditioning:
    """UNet conditioning for a list of prompts.

    hidden: [N, 77, D] text-encoder states; pooled / time_ids: SDXL's added conditions
    ([N, P] pooled text embedding, [N, 6] original size, crop, target size), None on SD1/SD2.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> Conditioning:
        pick = (lambda t: None if t is None else t[index])
        return Conditioning(self.hidden[index], pick(self.pooled), pick(self.time_ids))

    def cat(self, other: Conditioning) -> Conditioning:
        join = (lambda a, b: None if a is None else torch.cat([a, b]))
        return Conditioning(torch.cat([self.hidden, other.hidden]), join(self.pooled, other.pooled),
                            join(self.time_ids, other.time_ids))


@torch.no_grad()
def encode_text(base: BaseModel, prompts: list[str], resolution: int) -> Conditioning:
    """Encode prompts with the pipeline's own encode_prompt (same tokenisation as generation).

    Args:
        base: the loaded base model.
        prompts: N prompts.
        resolution: the training resolution (SDXL's size conditioning).

    Returns:
        `Conditioning` with N rows, on the base's device, in its dtype.
    """
    pipe = base.pipe
    base.text_encoders_on_device(True)
    if base.arch == "sdxl":
        hidden, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=base.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        size = (resolution, resolution)
        time_ids = torch.tensor([list(size + (0, 0) + size)] * len(prompts), dtype=hidden.dtype,
                                device=base.device)
        return Conditioning(hidden, pooled, time_ids)
    hidden, _ = pipe.encode_prompt(prompts, base.device, 1, False)
    return Conditioning(hidden)


def encode_captions(base: BaseModel, captions: list[str], resolution: int) -> Conditioning:
    """One conditioning row per caption, each distinct caption encoded once (training sets repeat them)."""
    unique = sorted(set(captions))
    table = encode_text(base, unique, resolution)
    return table.select(torch.tensor([unique.index(c) for c in captions], device=base.device))


def images_to_tensor(images: list[Image.Image], flip: bool = False) -> torch.Tensor:
    """PIL RGB images → [N, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x.flip(-1) if flip else x


@torch.no_grad()
def encode_images(base: BaseModel, images: list[Image.Image], flip: bool = False,
                  batch_size: int = 8) -> torch.Tensor:
    """VAE posterior parameters for images: [N, 2·C, h, w] (mean and log-variance), sampled per step later.

    A VAE whose config asks for it (`force_upcast`: SDXL's overflows in fp16) encodes in fp32, as diffusers'
    pipelines decode.
    """
    vae = base.pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        x = images_to_tensor(images, flip)
        # At most one megapixel per chunk: the encoder's first activations are 128 channels at full size (fp32 at
        # 1024 px: 512 MB each), so SDXL encodes one image at a time.
        per_chunk = max(1, min(batch_size, 2**20 // (x.shape[-1] * x.shape[-2])))
        out = []
        for chunk in x.split(per_chunk):
            dist = vae.encode(chunk.to(base.device, vae.dtype)).latent_dist
            out.append(torch.cat([dist.mean, dist.logvar], dim=1).float())
        return torch.cat(out)
    finally:
        if upcast:
            vae.to(torch.float16)


def sample_latents(moments: torch.Tensor, base: BaseModel, generator: torch.Generator) -> torch.Tensor:
    """Draw VAE latents from cached moments and scale them as the pipeline expects."""
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
    cfg = base.pipe.vae.config
    shift = cfg.get("shift_factor") or 0.0
    return (z - shift) * cfg.scaling_factor


def unet_forward(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
    """One UNet pass with SDXL's added conditions when present."""
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return unet(noisy, timesteps, encoder_hidden_states=cond.hidden, added_cond_kwargs=added,
                return_dict=False)[0]


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: ε, or v for v-prediction models (SD2-768)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")
