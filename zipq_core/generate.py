"""Generation with any number of adapters, each at its own strength (DESIGN §6)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from .adapters import Adapter, applied, load_adapter
from .base import BaseModel
from .config import GenerateConfig, check_strength
from .errors import ZipqError


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """'path/to/adapter:0.8' → ('path/to/adapter', 0.8); the strength defaults to 1.

    A colon inside the path (Windows drives) is kept when what follows the last colon is not a number.
    """
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, check_strength(float(tail))
        except ValueError:
            pass
    return text, 1.0


def generate(base: BaseModel, config: GenerateConfig, adapters: Sequence[tuple[Adapter, float]] = (),
             on_step: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """Generate images from the base model with adapters fused at their strengths.

    The adapters are fused into the weights for the duration of the call (as fast as the base model)
    and the base weights are restored afterwards, bit for bit.

    Args:
        base: the loaded base model.
        config: prompt, seed, steps, guidance, size, count.
        adapters: (adapter, strength) pairs, strengths in [0, 1.5]; 0 leaves the base untouched.
        on_step: called as on_step(step, total) after each denoising step.

    Returns:
        `config.num_images` PIL images.
    """
    callback = None
    if on_step is not None:
        def callback(pipe, step, timestep, kwargs):  # diffusers' callback_on_step_end signature
            on_step(step + 1, config.steps)
            return kwargs
    with base.lock, applied(base.pipe, adapters), torch.inference_mode():
        # A CPU generator gives the same images on every device for a seed.
        generator = torch.Generator("cpu").manual_seed(config.seed)
        try:
            result = base.pipe(prompt=config.prompt, negative_prompt=config.negative_prompt or None,
                               num_inference_steps=config.steps, guidance_scale=config.guidance,
                               width=config.width, height=config.height, num_images_per_prompt=config.num_images,
                               generator=generator, callback_on_step_end=callback)
        except torch.cuda.OutOfMemoryError as e:
            raise ZipqError("The GPU ran out of memory: generate fewer images at once or a smaller size.") from e
    return result.images


def load_adapters(specs: Sequence[str]) -> list[tuple[Adapter, float]]:
    """CLI-style 'PATH[:STRENGTH]' strings → loaded adapters with strengths."""
    return [(load_adapter(path), strength) for path, strength in map(parse_adapter_arg, specs)]
