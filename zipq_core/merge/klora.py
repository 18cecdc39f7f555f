"""K-LoRA (Ouyang, Li and Hou, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs", CVPR 2025):
a training-free merge that picks, at every denoising step and for every adapted layer, the change of one adapter.

For a layer with subject change ΔW_c and style change ΔW_s:

    S_c = Σ of the k largest |ΔW_c| elements,  S_s the same for ΔW_s
    γ   = mean over the layers both adapt of Σ|ΔW_c| / Σ|ΔW_s|      (puts the two adapters on one scale)
    the subject's change is used when  S_c / γ > S_s · (α · progress + β),  else the style's

with progress = step index / number of steps (0 at the first, noisiest step), α = 1.5, β = 0.5, k = 64 as in the
authors' released code: the style's score is halved at the start and doubled at the end, so the subject lays out
the image and the style draws its texture.

How it applies here (the paper has plain LoRAs on SDXL's attention projections only):
- DoRA: the change compared is the layer's *effective* change at strength 1, fuse(W0, layer) − W0 (magnitude
  included), and the winner's layer is fused as it is (its own magnitude), so one adapter alone in a layer is exactly
  that adapter there.
- Layers: every layer either adapter adapts (attention, feed-forward, projections, ResNet convolutions): on mini the
  style lives largely in the 16×16 convolutions, and a rule restricted to attention would have to either drop those
  layers or add them up (a direct merge in disguise). A layer only one adapter adapts scores 0 for the other, so it
  always takes the adapter that has it.
- Strengths: the sliders multiply each adapter's change as elsewhere (the subject's detail strength below the
  hand-off included); the choice itself is made on the changes as trained (for LoRA γ cancels any common scale).
- There is no merged file: generation re-fuses, at each step, only the layers whose winner changed
  (adapters.Phases), in place, so no second copy of the weights is made.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..adapters import Adapter, LoraLayer, fuse_weight, import_adapter, resolve_module
from ..base import BaseModel
from ..config import GenerateConfig, KLoraConfig, Sliders, check_strength
from ..generation.sample import AdapterSpec, OnStep, PhaseSchedule, ScheduleFn, detail_spec, generate

__all__ = ["KLoraConfig", "KLoraPlan", "LayerScores", "effective_change", "klora_generate", "klora_plan",
           "layer_scores", "style_factor", "subject_wins", "top_k_sum", "winners_table"]


APP_SLIDERS = Sliders()  # the app's strengths and hand-off, as every merge is generated with
PAPER = KLoraConfig()  # k, α, β of the authors' code


@dataclass(frozen=True)
class LayerScores:
    """Each layer's top-k scores for the two adapters (0 where an adapter does not adapt the layer) and γ."""

    keys: list[str]
    subject: torch.Tensor  # [L] S_c
    style: torch.Tensor  # [L] S_s
    gamma: float


# ---------------------------------------------------------------------------------------------------------
# The rule: pure functions on tensors
# ---------------------------------------------------------------------------------------------------------

def effective_change(w0: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """The layer's change of the weight at strength 1 in fp32: ΔW for LoRA, fuse(W0, layer) − W0 for DoRA."""
    if layer.magnitude is None:
        return layer.delta()
    return fuse_weight(w0, [(layer, 1.0)]) - w0.float()


def top_k_sum(change: torch.Tensor, k: int) -> float:
    """Σ of the k largest |elements| (all of them when the layer has fewer than k)."""
    flat = change.abs().flatten()
    return float(flat.topk(min(k, flat.numel())).values.sum())


def layer_scores(w0s: Mapping[str, torch.Tensor], subject: Adapter, style: Adapter, k: int) -> LayerScores:
    """S_c, S_s per layer and γ for two adapters.

    Args:
        w0s: the base weight of every layer either adapter adapts (keyed like the adapters' layers).
        subject, style: the two adapters.
        k: how many elements are summed.

    Returns:
        `LayerScores` over the sorted union of the adapters' layers.
    """
    keys = sorted(set(subject.layers) | set(style.layers))
    scores: dict[str, list[float]] = {"subject": [], "style": []}
    ratios = []
    for key in keys:
        changes = {name: effective_change(w0s[key], a.layers[key]) if key in a.layers else None
                   for name, a in (("subject", subject), ("style", style))}
        for name, change in changes.items():
            scores[name].append(0.0 if change is None else top_k_sum(change, k))
        if changes["subject"] is not None and changes["style"] is not None:
            total = float(changes["style"].abs().sum())
            if total > 0:
                ratios.append(float(changes["subject"].abs().sum()) / total)
    gamma = sum(ratios) / len(ratios) if ratios else 1.0
    return LayerScores(keys, torch.tensor(scores["subject"], dtype=torch.float64),
                       torch.tensor(scores["style"], dtype=torch.float64), gamma if gamma > 0 else 1.0)


def style_factor(progress: float, alpha: float, beta: float) -> float:
    """The factor on the style's score at a point of the denoising (0 = first step, 1 = the end)."""
    return alpha * progress + beta


def subject_wins(scores: LayerScores, progress: float, cfg: KLoraConfig) -> torch.Tensor:
    """[L] bool: True where the layer takes the subject's change at this point of the denoising."""
    return scores.subject / scores.gamma > scores.style * style_factor(progress, cfg.alpha, cfg.beta)


def winners_table(scores: LayerScores, steps: int, cfg: KLoraConfig) -> torch.Tensor:
    """[steps, L] bool: the subject wins layer l at step i (progress i / steps)."""
    return torch.stack([subject_wins(scores, i / steps, cfg) for i in range(steps)])


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KLoraPlan:
    """What `generate` needs for K-LoRA: the two adapters at their strengths (they also judge the candidates) and
    the per-step schedule of phases."""

    adapters: list[AdapterSpec]
    schedule: ScheduleFn
    scores: LayerScores


def klora_plan(base: BaseModel, subject: str | Path | Adapter, style: str | Path | Adapter,
               sliders: Sliders = APP_SLIDERS, cfg: KLoraConfig = PAPER) -> KLoraPlan:
    """Score the two adapters' layers on this base and build the per-step schedule (scored once, used by every
    candidate round).

    Args:
        base: the base model both adapters were trained on.
        subject, style: adapter folders, files (any `adapters.import_adapter` reads) or `Adapter`s.
        sliders: the subject and style strengths and the subject's detail fraction below the hand-off.
        cfg: k, α, β.
    """
    subj, sty = (a if isinstance(a, Adapter) else import_adapter(a, base) for a in (subject, style))
    with base.lock:  # the base weights, not someone else's fused ones
        keys = set(subj.layers) | set(sty.layers)
        w0s = {k: resolve_module(base.pipe, k).weight.data for k in keys}
        scores = layer_scores(w0s, subj, sty, cfg.top_k)
    first = detail_spec(subj, sliders.subject, sliders.subject_detail)
    style_strength = check_strength(sliders.style)
    adapters: list[AdapterSpec] = [first, (sty, style_strength)]
    return KLoraPlan(adapters, _schedule(scores, subj, sty, first[1], first[-1], style_strength, cfg), scores)


def _schedule(scores: LayerScores, subject: Adapter, style: Adapter, strength: float, detail: float,
              style_strength: float, cfg: KLoraConfig) -> ScheduleFn:
    """The schedule for one request: per step of the scheduler, the layers the subject wins and whether the step is
    below the hand-off; one phase per distinct pair, in order of first use."""
    parts: dict[bytes, tuple[Adapter, Adapter]] = {}

    def restricted(wins: torch.Tensor) -> tuple[Adapter, Adapter]:
        key = wins.numpy().tobytes()
        if key not in parts:  # the same LoraLayer objects, so Phases sees unchanged layers as unchanged
            won = {k for k, w in zip(scores.keys, wins.tolist()) if w}
            parts[key] = (_only(subject, won), _only(style, set(scores.keys) - won))
        return parts[key]

    def schedule(base: BaseModel, config: GenerateConfig, adapters) -> PhaseSchedule:
        timesteps = _step_timesteps(base, config.steps)
        threshold = config.handoff * base.pipe.scheduler.config.num_train_timesteps
        table = winners_table(scores, len(timesteps), cfg)
        phases, index_of, step_phase = [], {}, []
        for i, t in enumerate(timesteps):
            late = detail != strength and t < threshold
            key = (table[i].numpy().tobytes(), late)
            if key not in index_of:
                subj, sty = restricted(table[i])
                index_of[key] = len(phases)
                phases.append([(subj, detail if late else strength), (sty, style_strength)])
            step_phase.append(index_of[key])

        def pick(t: float) -> int:  # the nearest step's phase (a scheduler may evaluate between its steps)
            return step_phase[min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - t))]

        return PhaseSchedule(phases, pick)

    return schedule


def _only(adapter: Adapter, keys: set[str]) -> Adapter:
    return Adapter(layers={k: x for k, x in adapter.layers.items() if k in keys}, use_dora=adapter.use_dora,
                   info=adapter.info)


def _step_timesteps(base: BaseModel, steps: int) -> list[float]:
    """The timesteps the pipeline's scheduler will visit for `steps` steps (a fresh copy: the pipeline's own is left
    as it is)."""
    scheduler = type(base.pipe.scheduler).from_config(base.pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def klora_generate(base: BaseModel, config: GenerateConfig, subject: str | Path | Adapter,
                   style: str | Path | Adapter, sliders: Sliders = APP_SLIDERS, cfg: KLoraConfig = PAPER,
                   on_step: OnStep | None = None, cancel: threading.Event | None = None) -> list[Image.Image]:
    """Generate with K-LoRA from a subject and a style adapter (what the app and the CLI call).

    Args:
        base: the base model both adapters were trained on.
        config: prompt, seed, steps, guidance, size, count, hand-off, candidates (judged by the two adapters).
        subject, style: adapter folders, files (any `adapters.import_adapter` reads: ours, diffusers, kohya,
            LyCORIS, peft) or `Adapter`s; LoRA or DoRA, float or INT8.
        sliders: the subject and style strengths and the subject's detail fraction below the hand-off.
        cfg: K-LoRA's k, α, β.
        on_step: called as on_step(done, total) after each denoising step and each judge.
        cancel: set it to stop between denoising steps (`Cancelled` is raised).

    Returns:
        `config.num_images` images; the base weights are restored bit for bit.
    """
    plan = klora_plan(base, subject, style, sliders, cfg)
    return generate(base, config, plan.adapters, on_step=on_step, cancel=cancel, schedule=plan.schedule)
