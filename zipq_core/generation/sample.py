"""Generation with any number of adapters, each at its own strength (DESIGN §6)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from PIL import Image

from ..adapters import Adapter, Phases, applied_phases, import_adapter
from ..base import BaseModel, out_of_memory
from ..config import GenerateConfig, check_fraction, check_strength
from ..errors import Cancelled
from .rerank import best_of, candidate_scores, candidate_seed, judges_for


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


# (adapter, strength) or (adapter, strength, detail strength): the detail strength replaces the strength at
# noise levels below GenerateConfig.handoff (the late, fine-detail steps).
AdapterSpec = tuple[Adapter, float] | tuple[Adapter, float, float]
OnStep = Callable[[int, int], None]


@dataclass(frozen=True)
class PhaseSchedule:
    """Settings of the adapters' strengths per layer (phases) and the one each UNet call uses.

    `pick(timestep)` → index into `phases`; one phase needs no pick. Phases that share a layer at the same strength
    share its fused weight (adapters.Phases re-fuses only the layers that differ).
    """

    phases: list[list[tuple[Adapter, float]]]
    pick: Callable[[float], int] = lambda t: 0


# How a request's adapters become phases: (base, config, adapters) → PhaseSchedule. The default is the hand-off
# (`handoff_schedule`); K-LoRA (merge.klora) gives a per-step choice of each layer's adapter.
ScheduleFn = Callable[[BaseModel, GenerateConfig, Sequence[AdapterSpec]], PhaseSchedule]


def detail_spec(adapter: Adapter, strength: float, detail: float) -> AdapterSpec:
    """The adapter at `strength`, and at `strength × detail` below the hand-off; detail 1 gives the plain pair
    (constant strength, what a single adapter file gives in any other tool)."""
    strength = check_strength(strength)
    late = check_strength(strength * check_fraction(detail, "subject detail"))
    return (adapter, strength) if late == strength else (adapter, strength, late)


def active_adapters(adapters: Sequence[AdapterSpec]) -> list[Adapter]:
    """The adapters that change anything (a strength above 0 in some phase)."""
    return [spec[0] for spec in adapters if max(spec[1], spec[-1]) > 0]


def generation_units(config: GenerateConfig, adapters: Sequence[AdapterSpec]) -> tuple[int, int]:
    """(rounds of images, progress units): one unit per denoising step of every round, one per judge after."""
    active = active_adapters(adapters)
    rounds = config.candidates if active else 1
    return rounds, rounds * config.steps + (len(active) if rounds > 1 else 0)


def generate(base: BaseModel, config: GenerateConfig, adapters: Sequence[AdapterSpec] = (),
             on_step: OnStep | None = None, cancel: threading.Event | None = None,
             schedule: ScheduleFn | None = None) -> list[Image.Image]:
    """Generate images from the base model with adapters fused at their strengths.

    The adapters are fused into the weights for the duration of the call (as fast as the base model)
    and the base weights are restored afterwards, bit for bit. An adapter given a detail strength is
    re-fused once, when the denoising reaches `config.handoff`: a merged adapter's subject part at full
    strength while the layout forms and weaker while texture is drawn lets the style's texture through
    (bench/merge_quality.py measures it). With `config.candidates` = K > 1, K rounds of images are drawn
    (round 0 from the request's seed) and the adapters themselves pick the best of each image's K
    candidates (generation.rerank); without adapters there is nothing to judge and one round is drawn.

    Args:
        base: the loaded base model.
        config: prompt, seed, steps, guidance, size, count, hand-off noise level, candidates per image.
        adapters: (adapter, strength[, detail strength]), strengths in [0, 1.5]; 0 leaves the base untouched.
        on_step: called as on_step(done, total) after each denoising step and each judge (`generation_units`).
        cancel: set it to stop between denoising steps; the call then raises `Cancelled`.
        schedule: which setting of the adapters each denoising step uses (default: `handoff_schedule`); the
            adapters themselves still judge the candidates.

    Returns:
        `config.num_images` PIL images.
    """
    rounds, total = generation_units(config, adapters)
    report = (lambda done: None) if on_step is None else (lambda done: on_step(done, total))
    with base.lock, out_of_memory("generate fewer images at once, a smaller size or fewer candidates"):
        base.text_encoders_on_device(True)
        images: list[Image.Image] = []
        for k in range(rounds):
            seeded = replace(config, seed=candidate_seed(config.seed, k))
            images += _render(base, seeded, adapters, lambda step, k=k: report(k * config.steps + step), cancel,
                              schedule or handoff_schedule)
        if rounds == 1:
            return images
        scores = candidate_scores(base, images, judges_for(active_adapters(adapters)), config.prompt,
                                  on_judge=lambda i: report(rounds * config.steps + i + 1))
    return [images[i] for i in best_of(scores, config.num_images, rounds)]


def handoff_schedule(base: BaseModel, config: GenerateConfig, adapters: Sequence[AdapterSpec]) -> PhaseSchedule:
    """The strengths above `config.handoff`, and the detail strengths below it (one phase when none differs)."""
    early = [(spec[0], spec[1]) for spec in adapters]
    if all(spec[-1] == spec[1] for spec in adapters):
        return PhaseSchedule([early])
    late = [(spec[0], spec[-1]) for spec in adapters]
    threshold = config.handoff * base.pipe.scheduler.config.num_train_timesteps
    return PhaseSchedule([early, late], lambda t: 1 if t < threshold else 0)


def _render(base: BaseModel, config: GenerateConfig, adapters: Sequence[AdapterSpec],
            on_step: Callable[[int], None], cancel: threading.Event | None,
            schedule: ScheduleFn = handoff_schedule) -> list[Image.Image]:
    """One pipeline call: `config.num_images` images from `config.seed`."""

    def callback(pipe, step, timestep, kwargs):  # diffusers' callback_on_step_end signature
        on_step(step + 1)
        if cancel is not None and cancel.is_set():
            raise Cancelled("Generation cancelled.")
        return kwargs

    if cancel is not None and cancel.is_set():
        raise Cancelled("Generation cancelled.")
    _decode_in_pieces(base, config)
    with base.lock:
        plan = schedule(base, config, adapters)
    with base.lock, applied_phases(base.pipe, plan.phases) as state, _per_step(base, state, plan), \
            torch.inference_mode():
        # A CPU generator gives the same images on every device for a seed.
        generator = torch.Generator("cpu").manual_seed(config.seed)
        latents = base.pipe(prompt=config.prompt, negative_prompt=config.negative_prompt or None,
                            num_inference_steps=config.steps, guidance_scale=config.guidance,
                            width=config.width, height=config.height, num_images_per_prompt=config.num_images,
                            generator=generator, callback_on_step_end=callback, output_type="latent").images
    # Decoded after the adapters are taken out again: the decode's activations (the largest of a 1024 px SDXL
    # generation) never meet the fused copies of the adapted weights.
    with base.lock, torch.inference_mode():
        return _decode(base, latents)


def _decode(base: BaseModel, latents: torch.Tensor) -> list[Image.Image]:
    """The pipeline's own decode (SD and SDXL alike): an fp16 VAE whose config asks for it decodes in fp32, latents
    denormalised by the VAE's mean and std when it has them, else by its scaling factor; the watermark where the
    pipeline has one."""
    pipe, vae = base.pipe, base.pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = latents.to(vae.device, vae.dtype)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            view = lambda values: torch.tensor(values).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * view(std) / vae.config.scaling_factor + view(mean)
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")


def _decode_in_pieces(base: BaseModel, config: GenerateConfig) -> None:
    """VAE slicing (one image at a time) for several images, and tiling above the VAE's own size: a 1024 px decode
    of four images at once would need several GB more than the denoising itself. Same images either way for one
    image at the VAE's size; tiles blend at their seams."""
    vae = base.pipe.vae
    if config.num_images > 1:
        vae.enable_slicing()
    else:
        vae.disable_slicing()
    side = int(vae.config.get("sample_size") or 512)
    if config.width * config.height > side * side:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


@contextmanager
def _per_step(base: BaseModel, state: Phases, plan: PhaseSchedule) -> Iterator[None]:
    """Select the plan's phase for each UNet call (the hand-off: detail strengths below it).

    A forward pre-hook reads each call's timestep, so it works for any scheduler and step count.
    """
    if len(state.groups) < 2:
        yield
        return

    def pick(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        state.select(plan.pick(float(torch.as_tensor(t).flatten()[0])))

    hook = base.unet.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


def load_adapters(specs: Sequence[str], base: BaseModel | None = None) -> list[tuple[Adapter, float]]:
    """CLI-style 'PATH[:STRENGTH]' strings → loaded adapters with strengths; any file `adapters.import_adapter`
    reads (kohya, LyCORIS, peft, diffusers), converted against `base`."""
    return [(import_adapter(path, base), strength) for path, strength in map(parse_adapter_arg, specs)]
