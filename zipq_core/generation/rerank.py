"""Best of several candidates per image, judged by the user's own adapters (no labels, no other model).

A diffusion model is a classifier in disguise (Li et al., "Your Diffusion Model is Secretly a Zero-Shot
Classifier", 2023): an image shows what an adapter learned when that adapter denoises it better than the base
model does. For a candidate image x and a judge (adapter A, a band of noise levels):

    evidence_A(x) = mean over t in the band and noises ε of  ‖ε − ε_base(x_t, p)‖² − ‖ε − ε_A(x_t, p)‖²
    (v in place of ε for v-prediction models)

with the same (t, ε) for both UNets, so most of the variance cancels, and p the generation prompt. A subject
is judged at high noise, where layout is decided; a style at low noise, where texture is drawn. Each judge's
evidence is standardised over the request's candidates, so neither concept's scale dominates, and a candidate
scores its *weakest* standardised evidence: the image must show every concept, and a clear subject cannot buy
back a missing style (a sum lets it). Every returned image is the best of its own candidates.

Why: with a merged subject and style on mini, which initial noise an image starts from decides more than any
slider (a large shape shows its texture, a thin one cannot); bench/merge_quality.py measures what picking
among candidates gains (rows zipq vs zipq_one, direct_best_of vs direct_handoff).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..adapters import Adapter, applied
from ..base import BaseModel
from ..encode import diffusion_target, encode_images, encode_text, sample_latents, unet_forward

# Noise bands as fractions of the training timesteps. In a probe on mini (4 held-out pairs, 64 merged images
# each, evidence at 10 noise levels) the subject adapter's evidence ranked images most like the offline
# evaluator's subject score at levels 0.55-0.85 (Spearman 0.5-0.67 on three pairs), the style adapter's like
# its style score at 0.05-0.35 (0.3-0.7). bench/README.md says how the combination (the weakest judge) was chosen.
SUBJECT_BAND = (0.5, 0.9)
STYLE_BAND = (0.0, 0.4)
WHOLE_BAND = (0.0, 1.0)
BANDS = {"subject": SUBJECT_BAND, "style": STYLE_BAND}


@dataclass(frozen=True)
class Judge:
    """One concept's test: `adapter` at strength 1 against the base, at noise levels in `band`."""

    adapter: Adapter
    band: tuple[float, float]


def judges_for(adapters: Sequence[Adapter]) -> list[Judge]:
    """A judge per adapter, its band from the adapter's kind (subject, style, or anything else: every level)."""
    kinds = [str(a.info.get("kind")) for a in adapters]
    return [Judge(a, BANDS.get(kind, WHOLE_BAND)) for a, kind in zip(adapters, kinds)]


def candidate_seed(seed: int, k: int) -> int:
    """The seed of a request's k-th round of candidates; round 0 is the request's own seed, so one candidate
    gives exactly the images of a plain request."""
    return (seed + k * 1_000_003) % 2**63


@torch.no_grad()
def evidence(base: BaseModel, images: Sequence[Image.Image], judge: Judge, prompt: str, levels: int = 4,
             noises: int = 2, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """How much better the judge's adapter denoises each image than the base model does.

    Args:
        base: the base model (its weights untouched on return, bit for bit).
        images: N candidate images.
        judge: the adapter and the noise band.
        prompt: the prompt the images were generated from.
        levels: noise levels, evenly spaced in the band (the midpoints of `levels` equal slices).
        noises: noise draws per level.
        seed: for the noise draws; the same draws go to both UNets.
        batch_size: images per UNet call (memory on large models).

    Returns:
        [N] evidence (mean squared-error difference; larger = more like the adapter's concept).
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    total = scheduler.config.num_train_timesteps
    low, high = judge.band
    steps = [int(total * (low + (high - low) * (i + 0.5) / levels)) for i in range(levels)]
    moments = encode_images(base, list(images))
    n = moments.shape[0]
    cond = encode_text(base, [prompt], base.default_size).select(torch.zeros(n, dtype=torch.long, device=base.device))
    generator = torch.Generator("cpu").manual_seed(seed)
    draws = []
    for t in steps:
        for _ in range(noises):
            latents = sample_latents(moments, base, generator)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            timesteps = torch.full((n,), t, dtype=torch.long, device=latents.device)
            target = diffusion_target(scheduler, latents, noise, timesteps)  # ε, or v for v-prediction models
            draws.append((scheduler.add_noise(latents, noise, timesteps), target, timesteps))
    errors = []
    for adapters in ([], [(judge.adapter, 1.0)]):
        with applied(base.pipe, adapters):
            errors.append(sum(_errors(base, x, target, t, cond, batch_size) for x, target, t in draws) / len(draws))
    return (errors[0] - errors[1]).cpu()


def _errors(base: BaseModel, noisy: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, cond,
            batch_size: int) -> torch.Tensor:
    """Per-image squared error of the UNet's prediction, `batch_size` images per call: [N]."""
    out = []
    for start in range(0, noisy.shape[0], batch_size):
        part = slice(start, start + batch_size)
        index = torch.arange(part.start, min(part.stop, noisy.shape[0]), device=noisy.device)
        prediction = unet_forward(base.unet, noisy[part].to(base.unet.dtype), timesteps[part], cond.select(index))
        out.append(_squared_error(prediction, target[part]))
    return torch.cat(out)


def _squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of a UNet prediction: [N]."""
    return (prediction.float() - target.float()).square().flatten(1).mean(1)


def candidate_scores(base: BaseModel, images: Sequence[Image.Image], judges: Sequence[Judge], prompt: str,
                     on_judge: Callable[[int], None] | None = None) -> torch.Tensor:
    """Each candidate's weakest standardised evidence over the judges, over all candidates of a request: [N].

    `on_judge(i)` is called after judge i has scored every candidate (progress: judging takes a while too).
    """
    if len(images) < 2 or not judges:  # nothing to choose between, or no one to choose
        return torch.zeros(len(images))
    evidences = []
    for i, judge in enumerate(judges):
        evidences.append(evidence(base, images, judge, prompt))
        if on_judge is not None:
            on_judge(i)
    return weakest(evidences)


def weakest(evidences: Sequence[torch.Tensor]) -> torch.Tensor:
    """Min over judges of each judge's evidence standardised over the candidates ([N] each → [N]).

    Why the minimum and not a (weighted) sum: a sum lets a candidate that shows one concept very clearly win
    without the other. On mini (bench/candidate_rules.py: 4 pairs, ZipQDoRA as the app generates, 32 images
    per run, training seeds 3 and 4, which the benchmark does not use) a sum with the style weighted 1.25
    scored 0.687 subject / 0.758 style fidelity, the minimum 0.757 / 0.728; most of the gain is moon × grid,
    0.65 → 0.86 and 0.62 → 0.81 subject at seeds 3 and 4 with its style unchanged (0.96-0.99).
    """
    return torch.stack([standardised(e) for e in evidences]).min(0).values


def standardised(values: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation over the candidates (a constant stays 0)."""
    return (values - values.mean()) / values.std().clamp_min(1e-12)


def best_of(scores: torch.Tensor, count: int, rounds: int) -> list[int]:
    """Candidates are laid out round by round ([round 0's `count` images, round 1's, …]); image i's candidates
    are i, i + count, …. Returns the index of the best candidate of each image (ties: the earliest round)."""
    grid = scores.view(rounds, count)  # [rounds, count]
    return [int(grid[:, i].argmax()) * count + i for i in range(count)]
