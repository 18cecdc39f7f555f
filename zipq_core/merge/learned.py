"""The learned merges: ZipLoRA and ZipQDoRA.

Every method produces two *parts*, a subject part and a style part, each an ordinary LoRA/DoRA
adapter, such that fusing both at strength 1 (adapters.fuse_weight) is the merged model. That gives:
- the merged file: the parts concatenated along the rank (B = [B_c | B_s], A = [A_c ; A_s]) with the
  DoRA magnitude of the fused weight, a standard adapter that diffusers' `load_lora_weights` reads;
- the sliders: the parts at strengths (w_c, w_s); (0, 0) is the base model exactly.

ZipLoRA (arXiv 2311.13600) learns per-column mergers m_c, m_s ∈ R^in:
    W = W0 + ΔW_c·diag(m_c) + ΔW_s·diag(m_s),   ΔW·diag(m)·x = B·A·(m ⊙ x),
so the merge stays low rank: A_c·diag(m_c) is the merged part's lora_A. ZipQDoRA (this project) applies
the same mergers to the two DoRA directions and learns per-row magnitude coefficients a_c, a_s ∈ R^out:
    m = ‖W0‖ + a_c ⊙ (m_c − ‖W0‖) + a_s ⊙ (m_s − ‖W0‖),   W = m ⊙ V / ‖V‖,
both trained with ZipLoRA's loss against the single-adapter UNets (same noise, same timesteps).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters import Adapter, fuse_weight, load_training_views, resolve_module
from ..base import BaseModel
from ..config import MergeConfig
from ..encode import encode_images, encode_text, sample_latents, unet_forward
from ..errors import ZipqError
from ..progress import MergeStep, eta
from .parts import base_norms, scaled_part


@dataclass
class _Mergers:
    """Learned vectors per module: column mergers [in] for each present adapter, row coefficients [out]."""

    column: dict[str, list[torch.Tensor]]
    row: dict[str, list[torch.Tensor | None]]

    def parameters(self) -> list[torch.Tensor]:
        return [t for ts in self.column.values() for t in ts] + \
               [t for ts in self.row.values() for t in ts if t is not None]


def _init_mergers(subject: Adapter, style: Adapter, learn_magnitude: bool) -> _Mergers:
    column, row = {}, {}
    for key in set(subject.layers) & set(style.layers):  # only shared modules compete
        layers = (subject.layers[key], style.layers[key])
        column[key] = [torch.ones(layers[0].down.shape[1], requires_grad=True) for _ in layers]
        row[key] = [torch.ones(x.up.shape[0], requires_grad=True) if learn_magnitude and x.magnitude is not None
                    else None for x in layers]
    return _Mergers(column, row)


def _learned_parts(pipe, subject: Adapter, style: Adapter, mergers: _Mergers,
                   norms: dict[str, torch.Tensor]) -> tuple[Adapter, Adapter]:
    """The two parts for the current merger values (differentiable in the mergers)."""
    out: tuple[dict, dict] = ({}, {})
    for i, adapter in enumerate((subject, style)):
        for key, layer in adapter.layers.items():
            col = mergers.column[key][i] if key in mergers.column else None
            row = mergers.row[key][i] if key in mergers.row else None
            out[i][key] = scaled_part(layer, col, row, norms[key])
    return (Adapter(out[0], subject.use_dora, dict(subject.info)), Adapter(out[1], style.use_dora, dict(style.info)))


def _fused_params(pipe, parts: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """{unet parameter name: fused weight} for functional_call, differentiable through the parts."""
    keys = sorted(set().union(*(p.layers for p in parts)))
    out = {}
    for key in keys:
        module = resolve_module(pipe, key)
        layers = [(p.layers[key], 1.0) for p in parts if key in p.layers]
        out[key.partition(".")[2] + ".weight"] = fuse_weight(module.weight.data, layers).to(module.weight.dtype)
    return out


def _similarity(mergers: _Mergers, kind: str) -> torch.Tensor:
    """Σ over modules of the merger-similarity term.

    "product": mean|m_c ⊙ m_s| (DESIGN §7); it also rewards shrinking both mergers.
    "cosine": |cos(m_c, m_s)| (ZipLoRA's paper); scale-free, it only rewards using different columns.
    """
    if kind == "cosine":
        terms = [F.cosine_similarity(c[0], c[1], dim=0).abs() for c in mergers.column.values()]
    else:
        terms = [(c[0] * c[1]).abs().mean() for c in mergers.column.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _concept_data(base: BaseModel, adapter_dir: Path | None, adapter: Adapter, resolution: int):
    """Latent moments and conditioning for an adapter's own training views (or images it generates)."""
    views = load_training_views(adapter_dir) if adapter_dir is not None else None
    if views is None:  # an adapter brought from elsewhere: let it draw its own concept
        from ..config import GenerateConfig
        from ..generation import generate

        prompt = adapter.info.get("instance_prompt") or "a picture"
        images = [generate(base, GenerateConfig(prompt=prompt, seed=i, width=resolution, height=resolution),
                           [(adapter, 1.0)])[0] for i in range(4)]
        views = (images, [prompt] * len(images))
    images, captions = views
    unique = sorted(set(captions))
    table = encode_text(base, unique, resolution)
    index = torch.tensor([unique.index(c) for c in captions], device=base.device)
    return encode_images(base, images).to(base.device), table.select(index)


def learned_merge(base: BaseModel, subject: Adapter, style: Adapter, dirs: tuple[Path | None, Path | None],
                   cfg: MergeConfig, cancel: threading.Event | None) -> Iterator[MergeStep | tuple[Adapter, Adapter]]:
    from diffusers import DDPMScheduler

    pipe, unet = base.pipe, base.unet
    resolution = base.default_size
    norms = base_norms(pipe, set(subject.layers) | set(style.layers))
    mergers = _init_mergers(subject, style, learn_magnitude=cfg.method == "zipq")
    if not mergers.column:
        raise ZipqError("The two adapters share no layer: nothing to merge (were they trained on other targets?).")
    optimizer = torch.optim.Adam(mergers.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    data_c = _concept_data(base, dirs[0], subject, resolution)
    data_s = _concept_data(base, dirs[1], style, resolution)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    # Targets come from the UNet with exactly one adapter on (constant fused weights).
    with torch.no_grad():
        only_c = _fused_params(pipe, [subject])
        only_s = _fused_params(pipe, [style])
    started = time.time()
    for step in range(1, cfg.steps + 1):
        if cancel is not None and cancel.is_set():
            yield MergeStep(step - 1, cfg.steps, cancelled=True, elapsed=time.time() - started)
            return
        batch = []
        for moments, cond in (data_c, data_s):
            index = torch.randint(0, moments.shape[0], (cfg.batch_size,), generator=generator)
            batch.append((sample_latents(moments[index], base, generator), cond.select(index.to(base.device))))
        noise = torch.randn(batch[0][0].shape, generator=generator).to(base.device)  # same ε for both
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        t = t.to(base.device)  # and the same timesteps
        noisy = [scheduler.add_noise(z, noise, t) for z, _ in batch]
        with torch.no_grad():
            target_c = _call(unet, only_c, noisy[0], t, batch[0][1])
            target_s = _call(unet, only_s, noisy[1], t, batch[1][1])
        merged = _fused_params(pipe, _learned_parts(pipe, subject, style, mergers, norms))
        pred_c = _call(unet, merged, noisy[0], t, batch[0][1])
        pred_s = _call(unet, merged, noisy[1], t, batch[1][1])
        loss_c, loss_s = F.mse_loss(pred_c, target_c), F.mse_loss(pred_s, target_s)
        similarity = _similarity(mergers, cfg.similarity)
        loss = loss_c + loss_s + cfg.lam * similarity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = time.time() - started
        mean_sim = float(similarity.detach()) / max(1, len(mergers.column))
        total, term_c, term_s = (float(x.detach()) for x in (loss, loss_c, loss_s))
        if not math.isfinite(total):
            raise ZipqError(f"The merge diverged at step {step} (loss {total}): lower the learning rate.")
        yield MergeStep(step, cfg.steps, total, elapsed, eta(elapsed, step, cfg.steps), loss_subject=term_c,
                        loss_style=term_s, similarity=mean_sim)
        if mean_sim < cfg.early_stop:
            break
    with torch.no_grad():
        yield _learned_parts(pipe, subject, style, mergers, norms)


class _Bound(torch.nn.Module):
    """Wraps the UNet so functional_call can run our conditioned UNet call with substituted weights."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, timesteps, cond):
        return unet_forward(self.inner, x, timesteps, cond)


def _call(unet, params: dict[str, torch.Tensor], noisy, t, cond) -> torch.Tensor:
    """The UNet with some weights replaced (differentiably) by `params`; the module itself is untouched."""
    from torch.func import functional_call

    named = {f"inner.{k}": v for k, v in params.items()}
    return functional_call(_Bound(unet), named, (noisy, t, cond), strict=False).float()
