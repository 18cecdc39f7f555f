"""The learned merges, ZipLoRA and ZipQDoRA: two parts whose column mergers (and magnitudes) are trained.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters import Adapter, LoraLayer, load_training_views
from ..adapters.live import LiveLayer, live_layers
from ..base import BaseModel
from ..config import MergeConfig
from ..data import square_view
from ..encode import encode_captions, encode_images, sample_latents, unet_forward
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


def _init_mergers(subject: Adapter, style: Adapter, learn_magnitude: bool, device: torch.device) -> _Mergers:
    column, row = {}, {}
    ones = lambda n: torch.ones(n, device=device, requires_grad=True)
    for key in sorted(set(subject.layers) & set(style.layers)):  # only shared modules compete
        layers = (subject.layers[key], style.layers[key])
        column[key] = [ones(layers[0].down.shape[1]) for _ in layers]
        row[key] = [ones(x.up.shape[0]) if learn_magnitude and x.magnitude is not None else None for x in layers]
    return _Mergers(column, row)


def _learned_parts(subject: Adapter, style: Adapter, mergers: _Mergers,
                   norms: dict[str, torch.Tensor]) -> tuple[Adapter, Adapter]:
    """The two parts for the current merger values (differentiable in the mergers)."""
    out: tuple[dict, dict] = ({}, {})
    for i, adapter in enumerate((subject, style)):
        for key, layer in adapter.layers.items():
            col = mergers.column[key][i] if key in mergers.column else None
            row = mergers.row[key][i] if key in mergers.row else None
            out[i][key] = scaled_part(layer, col, row, norms[key])
    return (Adapter(out[0], subject.use_dora, dict(subject.info)), Adapter(out[1], style.use_dora, dict(style.info)))


def _on(adapter: Adapter, device: torch.device) -> Adapter:
    """The adapter's factors in fp32 on `device` (the mergers train there, beside the UNet)."""
    move = lambda t: None if t is None else t.detach().float().to(device)
    layers = {k: LoraLayer(move(x.down), move(x.up), x.scale, move(x.magnitude)) for k, x in adapter.layers.items()}
    return Adapter(layers, adapter.use_dora, dict(adapter.info))


def _show(live: dict[str, LiveLayer], *parts: Adapter) -> None:
    """Make each live layer add exactly the given adapters' layers (none: the base layer)."""
    for key, layer in live.items():
        layer.parts = [p.layers[key] for p in parts if key in p.layers]


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


def _balance(kind: str, live: dict[str, LiveLayer], unet, noisy: list[torch.Tensor], t: torch.Tensor,
             batch: list[tuple], targets: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Weights of the two reconstruction terms. "plain": 1 and 1 (ZipLoRA's loss). "relative": each term divided by
    how far its adapter moves the base's prediction on the same batch, rescaled so the weights average 1 (the
    similarity term keeps its share): a subtle adapter's errors count as much as a strong one's. "geometric" is
    weighed once the terms are computed (`geometric_weights`): 1 and 1 here."""
    if kind != "relative":
        return 1.0, 1.0
    _show(live)
    moved = [float(F.mse_loss(unet_forward(unet, x, t, cond).float(), target)) + 1e-12
             for x, (_, cond), target in zip(noisy, batch, targets)]
    return _inverse_weights(*moved)


def geometric_weights(loss_c: torch.Tensor, loss_s: torch.Tensor) -> tuple[float, float]:
    """The "geometric" balance: each reconstruction term divided by its own current value, rescaled so the weights
    average 1. The step is then along ∇(log L_c + log L_s): a strong subject's leak into the style's prompts (the
    larger term at the start) pulls the mergers no harder than a subtle style's leak into the subject's."""
    return _inverse_weights(float(loss_c.detach()) + 1e-12, float(loss_s.detach()) + 1e-12)


def _inverse_weights(c: float, s: float) -> tuple[float, float]:
    """Weights ∝ 1 / c and 1 / s, averaging 1."""
    return 2 * s / (c + s), 2 * c / (c + s)


def combined_captions(captions: list[str], style: Adapter) -> list[str]:
    """The subject's captions asking for the style: each caption, then "in <style token> style"."""
    token = style.info.get("token")
    if not token:
        raise ZipqError("keep_subject needs the style adapter's token (its sidecar has none): set keep_subject to 0 "
                        "or merge an adapter trained here.")
    return [f"{caption.rstrip(' .')}, in {token} style" for caption in captions]


def _concept_views(base: BaseModel, adapter_dir: Path | None, adapter: Adapter,
                   resolution: int) -> tuple[list, list[str]]:
    """An adapter's own training views (images, captions), or images it generates when it has none."""
    views = load_training_views(adapter_dir) if adapter_dir is not None else None
    if views is None:  # an adapter brought from elsewhere: let it draw its own concept
        from ..config import GenerateConfig
        from ..generation import generate

        prompt = adapter.info.get("instance_prompt") or "a picture"
        images = [generate(base, GenerateConfig(prompt=prompt, seed=i, width=resolution, height=resolution),
                           [(adapter, 1.0)])[0] for i in range(4)]
        views = (images, [prompt] * len(images))
    return views


def _concept_data(base: BaseModel, views: list[tuple[list, list[str]]], resolution: int) -> list[tuple]:
    """Latent moments and conditioning per concept: every caption first, then the text encoders leave the device
    before the VAE's activations arrive."""
    conds = [encode_captions(base, captions, resolution) for _, captions in views]
    base.text_encoders_on_device(False)
    data = []
    for (images, _), cond in zip(views, conds):
        if len({im.size for im in images}) > 1:  # aspect buckets: the merge takes centred squares of them
            images = [square_view(im, resolution) for im in images]
        data.append((encode_images(base, images).to(base.device), cond))
    return data


def learned_merge(base: BaseModel, subject: Adapter, style: Adapter, dirs: tuple[Path | None, Path | None],
                   cfg: MergeConfig, cancel: threading.Event | None) -> Iterator[MergeStep | tuple[Adapter, Adapter]]:
    """Train the mergers, yielding a `MergeStep` per step and finally the two learned parts.

    The UNet runs with `LiveLayer`s in place of the adapted modules: teachers (one adapter on) and the merged model
    add their parts to the activations, so no layer's weight is ever copied or densified. The row norms of DoRA stay
    in the graph (peft detaches them to avoid a dense [out, in] saved tensor; the Gram form costs [out, r]), so the
    mergers get the same gradients as through the fused weights.
    """
    from diffusers import DDPMScheduler

    pipe, unet, device = base.pipe, base.unet, base.device
    resolution = base.default_size
    norms = {k: v.to(device) for k, v in base_norms(pipe, set(subject.layers) | set(style.layers)).items()}
    subject, style = _on(subject, device), _on(style, device)
    mergers = _init_mergers(subject, style, learn_magnitude=cfg.method == "zipq", device=device)
    if not mergers.column:
        raise ZipqError("The two adapters share no layer: nothing to merge (were they trained on other targets?).")
    optimizer = torch.optim.Adam(mergers.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    # fp16 activations underflow in backward without loss scaling (the mergers themselves are fp32).
    scaler = torch.amp.GradScaler(device.type, enabled=base.dtype == torch.float16)
    views = [_concept_views(base, d, a, resolution) for d, a in zip(dirs, (subject, style))]
    combined = None
    if cfg.keep_subject:  # encoded before _concept_data sends the text encoders off the device
        combined = encode_captions(base, combined_captions(views[0][1], style), resolution)
    data_c, data_s = _concept_data(base, views, resolution)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    teacher_c, teacher_s = _learned_parts(subject, style, _Mergers({}, {}), norms)  # each alone, at strength 1
    started = time.time()
    checkpointing = cfg.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing")
    if checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        with live_layers(pipe, set(subject.layers) | set(style.layers)) as live:
            for step in range(1, cfg.steps + 1):
                if cancel is not None and cancel.is_set():
                    yield MergeStep(step - 1, cfg.steps, cancelled=True, elapsed=time.time() - started)
                    return
                batch, picked = [], []
                for moments, cond in (data_c, data_s):
                    index = torch.randint(0, moments.shape[0], (cfg.batch_size,), generator=generator)
                    batch.append((sample_latents(moments[index], base, generator), cond.select(index.to(device))))
                    picked.append(index.to(device))
                noise = torch.randn(batch[0][0].shape, generator=generator).to(device)  # same ε for both
                t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
                t = t.to(device)  # and the same timesteps
                noisy = [scheduler.add_noise(z, noise, t).to(base.dtype) for z, _ in batch]
                with torch.no_grad():
                    _show(live, teacher_c)
                    target_c = unet_forward(unet, noisy[0], t, batch[0][1]).float()
                    _show(live, teacher_s)
                    target_s = unet_forward(unet, noisy[1], t, batch[1][1]).float()
                    weights = _balance(cfg.balance, live, unet, noisy, t, batch, (target_c, target_s))
                _show(live, *_learned_parts(subject, style, mergers, norms))
                pred_c = unet_forward(unet, noisy[0], t, batch[0][1]).float()
                pred_s = unet_forward(unet, noisy[1], t, batch[1][1]).float()
                loss_c, loss_s = F.mse_loss(pred_c, target_c), F.mse_loss(pred_s, target_s)
                if cfg.balance == "geometric":
                    weights = geometric_weights(loss_c, loss_s)
                similarity = _similarity(mergers, cfg.similarity)
                loss = weights[0] * loss_c + weights[1] * loss_s + cfg.lam * similarity
                if combined is not None:  # the subject's images, asked for in the style: still the subject
                    pred_k = unet_forward(unet, noisy[0], t, combined.select(picked[0])).float()
                    loss = loss + cfg.keep_subject * F.mse_loss(pred_k, target_c)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                _show(live)  # drop the graph's last references before the next step
                elapsed = time.time() - started
                mean_sim = float(similarity.detach()) / max(1, len(mergers.column))
                total, term_c, term_s = (float(x.detach()) for x in (loss, loss_c, loss_s))
                if not math.isfinite(total):
                    raise ZipqError(f"The merge diverged at step {step} (loss {total}): lower the learning rate.")
                yield MergeStep(step, cfg.steps, total, elapsed, eta(elapsed, step, cfg.steps), loss_subject=term_c,
                                loss_style=term_s, similarity=mean_sim)
                if mean_sim < cfg.early_stop:
                    break
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
    with torch.no_grad():
        parts = _learned_parts(subject, style, mergers, norms)
    yield tuple(_on(p, torch.device("cpu")) for p in parts)
