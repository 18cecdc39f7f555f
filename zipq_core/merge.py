"""Merging a subject adapter and a style adapter: ZipQDoRA, ZipLoRA, direct, TIES, DARE, B-LoRA.

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

import json
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from .adapters import (
    Adapter,
    LoraLayer,
    direction_and_magnitude,
    fuse_weight,
    load_adapter,
    resolve_module,
    row_norm,
    save_adapter,
)
from .base import BaseModel
from .config import check_strength
from .errors import ZipqError
from .generate import AdapterSpec, detail_spec

MergeMethod = Literal["zipq", "zip", "direct", "ties", "dare", "blora"]
METHODS: tuple[str, ...] = ("zipq", "zip", "direct", "ties", "dare", "blora")
PARTS_DIR = "parts"
# B-LoRA (SDXL): content lives in the first attention of up_blocks.0, style in the second.
BLORA_CONTENT = "unet.up_blocks.0.attentions.0."
BLORA_STYLE = "unet.up_blocks.0.attentions.1."


@dataclass(frozen=True)
class MergeConfig:
    """How to merge. Learned methods (zipq, zip) use steps/lr/lam; the others are training-free."""

    method: MergeMethod = field(default="zipq", metadata={"help": "zipq, zip, direct, ties, dare or blora."})
    steps: int = field(default=100, metadata={"help": "Merger optimisation steps (ZipLoRA: ≤ 100)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Adam lr for the mergers (no weight decay); "
                                                                 "1e-2 let noisy steps undo the subject on mini."})
    lam: float = field(default=0.01, metadata={"help": "λ of the merger-similarity term (summed over layers)."})
    batch_size: int = field(default=2, metadata={"help": "Latents per concept per step."})
    seed: int = 0
    subject_weight: float = field(default=1.0, metadata={"help": "Subject weight (direct/ties/dare)."})
    style_weight: float = field(default=1.0, metadata={"help": "Style weight (direct/ties/dare)."})
    density: float = field(default=0.5, metadata={"help": "Fraction of ΔW kept by TIES trimming / DARE."})
    early_stop: float = field(default=1e-3, metadata={"help": "Stop when the mean similarity falls below this."})
    # The paper's cosine by default: DESIGN §7's product term also rewards shrinking both mergers, and it gave
    # the lowest subject and style fidelity in each of three comparisons on mini (4 held-out pairs each).
    similarity: Literal["product", "cosine"] = field(default="cosine",
                                                     metadata={"help": "Merger-similarity term (see _similarity)."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ZipqError(f"merge method {self.method!r} is unknown: use one of {', '.join(METHODS)}.")
        if not 1 <= self.steps <= 1000:
            raise ZipqError(f"merge steps must be between 1 and 1000, not {self.steps}.")
        if not 0 < self.learning_rate <= 1:
            raise ZipqError(f"merge learning rate {self.learning_rate} is out of range (try 1e-3…5e-2).")
        if self.similarity not in ("product", "cosine"):
            raise ZipqError(f"similarity must be 'product' or 'cosine', not {self.similarity!r}.")
        if not math.isfinite(self.lam) or self.lam < 0:
            raise ZipqError(f"λ must be a finite number ≥ 0 (e.g. 0.01), not {self.lam}.")
        if not math.isfinite(self.early_stop) or self.early_stop < 0:
            raise ZipqError(f"early stop must be a finite number ≥ 0, not {self.early_stop}.")
        if not 0 < self.density <= 1:
            raise ZipqError(f"density must be in (0, 1], not {self.density}.")
        for name in ("subject_weight", "style_weight"):
            if not 0 <= getattr(self, name) <= 1.5:
                raise ZipqError(f"{name.replace('_', ' ')} must be between 0 and 1.5.")

    @property
    def learned(self) -> bool:
        return self.method in ("zipq", "zip")


@dataclass
class MergeStep:
    """One record from the merge generator."""

    step: int
    total: int
    loss: float = float("nan")
    loss_subject: float = float("nan")
    loss_style: float = float("nan")
    similarity: float = float("nan")
    elapsed: float = 0.0
    eta: float = 0.0
    done: bool = False
    cancelled: bool = False
    adapter_dir: Path | None = None
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Parts: scaling and concatenation, exact
# ---------------------------------------------------------------------------------------------------------

def _scaled_part(layer: LoraLayer, column_scale: torch.Tensor | None, row_coef: torch.Tensor | None,
                 n0: torch.Tensor, weight: float = 1.0) -> LoraLayer:
    """A layer with its scale folded into `up`, columns scaled by `column_scale` and magnitude shift by `row_coef`.

    down' = down·diag(col) (conv: per input channel), up' = weight·scale·up, m' = ‖W0‖ + weight·a ⊙ (m − ‖W0‖).
    """
    down = layer.down.float()
    if column_scale is not None:
        down = down * column_scale.view(1, -1, *([1] * (down.dim() - 2)))
    magnitude = None
    if layer.magnitude is not None:
        shift = layer.magnitude.float() - n0
        magnitude = n0 + weight * (shift if row_coef is None else row_coef * shift)
    return LoraLayer(down=down, up=weight * layer.scale * layer.up.float(), scale=1.0, magnitude=magnitude)


def concat_parts(w0: torch.Tensor, parts: Sequence[LoraLayer]) -> LoraLayer:
    """Parts of one module → one layer of rank Σr whose DoRA forward equals the fused parts exactly.

    The direction W0 + Σ up_i·down_i is the concatenation; the magnitude is the fused target m (signed,
    so even a row whose m crossed zero is reproduced).
    """
    down = torch.cat([p.down.float() * p.scale for p in parts])
    up = torch.cat([p.up.float() for p in parts], dim=1)
    _, magnitude = direction_and_magnitude(w0, [(p, 1.0) for p in parts])
    return LoraLayer(down=down, up=up, scale=1.0, magnitude=magnitude)


def combine_parts(pipe, subject_part: Adapter, style_part: Adapter, info: dict) -> Adapter:
    """The single standard adapter equal to subject_part + style_part at strength 1."""
    layers = {}
    for key in sorted(set(subject_part.layers) | set(style_part.layers)):
        parts = [a.layers[key] for a in (subject_part, style_part) if key in a.layers]
        w0 = resolve_module(pipe, key).weight.data.float()
        layers[key] = concat_parts(w0, parts)
    return Adapter(layers=layers, use_dora=any(x.magnitude is not None for x in layers.values()), info=info)


def _base_norms(pipe, keys) -> dict[str, torch.Tensor]:
    return {k: row_norm(resolve_module(pipe, k).weight.data.float()).cpu() for k in keys}


# ---------------------------------------------------------------------------------------------------------
# Training-free methods
# ---------------------------------------------------------------------------------------------------------

def direct_parts(pipe, subject: Adapter, style: Adapter, cfg: MergeConfig) -> tuple[Adapter, Adapter]:
    """Weighted sum with the strength semantics of DESIGN §6."""
    return (_weighted(pipe, subject, cfg.subject_weight), _weighted(pipe, style, cfg.style_weight))


def _weighted(pipe, adapter: Adapter, weight: float, keep: str | None = None) -> Adapter:
    norms = _base_norms(pipe, adapter.layers)
    layers = {k: _scaled_part(x, None, None, norms[k], weight) for k, x in adapter.layers.items()
              if keep is None or k.startswith(keep)}
    return Adapter(layers=layers, use_dora=adapter.use_dora, info=dict(adapter.info))


def blora_parts(pipe, subject: Adapter, style: Adapter, cfg: MergeConfig) -> tuple[Adapter, Adapter]:
    """B-LoRA: the subject adapter's content block and the style adapter's style block (SDXL layout)."""
    content = _weighted(pipe, subject, cfg.subject_weight, keep=BLORA_CONTENT)
    look = _weighted(pipe, style, cfg.style_weight, keep=BLORA_STYLE)
    if not content.layers or not look.layers:
        raise ZipqError("B-LoRA needs adapters on SDXL's up_blocks.0.attentions.0 (content) and .1 (style); "
                        "these adapters have none there (SD1.x models lack that layout).")
    return content, look


def _svd_layer(delta: torch.Tensor, rank: int) -> tuple[LoraLayer, float]:
    """Best rank-r factorisation of a dense ΔW and its relative Frobenius error."""
    flat = delta.flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.numel())
    up = u[:, :r] * s[:r].sqrt()
    down = (vh[:r] * s[:r].sqrt()[:, None]).view(r, *delta.shape[1:])
    if delta.dim() == 4:
        up = up.view(*up.shape, 1, 1)
    err = float((s[r:].square().sum() / s.square().sum().clamp_min(1e-30)).sqrt())
    return LoraLayer(down=down, up=up, scale=1.0), err


def dense_parts(pipe, subject: Adapter, style: Adapter, cfg: MergeConfig) -> tuple[Adapter, Adapter, float]:
    """TIES (trim, elect sign, disjoint merge) or DARE (drop and rescale) on the dense ΔW, each part then
    re-compressed to its own rank by SVD (the lossy step, whose worst relative error is returned)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    parts = ({}, {})
    worst = 0.0
    for key in sorted(set(subject.layers) | set(style.layers)):
        w0 = resolve_module(pipe, key).weight.data.float().cpu()
        n0 = row_norm(w0)
        sources = [(i, a.layers[key], w) for i, (a, w) in
                   enumerate(((subject, cfg.subject_weight), (style, cfg.style_weight))) if key in a.layers]
        deltas = [w * layer.delta() for _, layer, w in sources]
        if cfg.method == "ties":
            deltas = _ties(deltas, cfg.density)
        else:
            deltas = [_dare(d, cfg.density, generator) for d in deltas]
        for (i, layer, w), delta in zip(sources, deltas):
            part, err = _svd_layer(delta, layer.rank)
            worst = max(worst, err)
            if layer.magnitude is not None:
                part.magnitude = n0 + w * (layer.magnitude.float() - n0)
            parts[i][key] = part
    make = lambda layers, src: Adapter(layers=layers, use_dora=src.use_dora, info=dict(src.info))
    return make(parts[0], subject), make(parts[1], style), worst


def _ties(deltas: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    """TIES-merging: keep each ΔW's top-density entries, elect a sign per entry, drop disagreeing ones."""
    trimmed = []
    for d in deltas:
        k = max(1, int(round(density * d.numel())))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    sign = torch.sign(sum(trimmed))
    return [torch.where(torch.sign(t) == sign, t, torch.zeros_like(t)) for t in trimmed]


def _dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries with probability 1 − density and rescale the rest by 1/density."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


# ---------------------------------------------------------------------------------------------------------
# Learned methods: ZipLoRA and ZipQDoRA
# ---------------------------------------------------------------------------------------------------------

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
            out[i][key] = _scaled_part(layer, col, row, norms[key])
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
    from .encode import encode_images, encode_text
    from .train import load_training_views

    views = load_training_views(adapter_dir) if adapter_dir is not None else None
    if views is None:  # an adapter brought from elsewhere: let it draw its own concept
        from .config import GenerateConfig
        from .generate import generate

        prompt = adapter.info.get("instance_prompt") or "a picture"
        images = [generate(base, GenerateConfig(prompt=prompt, seed=i, width=resolution, height=resolution),
                           [(adapter, 1.0)])[0] for i in range(4)]
        views = (images, [prompt] * len(images))
    images, captions = views
    unique = sorted(set(captions))
    table = encode_text(base, unique, resolution)
    index = torch.tensor([unique.index(c) for c in captions], device=base.device)
    return encode_images(base, images).to(base.device), table.select(index)


def _learned_merge(base: BaseModel, subject: Adapter, style: Adapter, dirs: tuple[Path | None, Path | None],
                   cfg: MergeConfig, cancel: threading.Event | None) -> Iterator[MergeStep | tuple[Adapter, Adapter]]:
    from diffusers import DDPMScheduler

    from .encode import sample_latents

    pipe, unet = base.pipe, base.unet
    resolution = base.default_size
    norms = _base_norms(pipe, set(subject.layers) | set(style.layers))
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
        yield MergeStep(step, cfg.steps, total, term_c, term_s, mean_sim, elapsed,
                        elapsed / step * (cfg.steps - step))
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
        from .encode import unet_forward

        return unet_forward(self.inner, x, timesteps, cond)


def _call(unet, params: dict[str, torch.Tensor], noisy, t, cond) -> torch.Tensor:
    """The UNet with some weights replaced (differentiably) by `params`; the module itself is untouched."""
    from torch.func import functional_call

    named = {f"inner.{k}": v for k, v in params.items()}
    return functional_call(_Bound(unet), named, (noisy, t, cond), strict=False).float()


# ---------------------------------------------------------------------------------------------------------
# Entry point and files
# ---------------------------------------------------------------------------------------------------------

def _as_adapter(source: str | Path | Adapter) -> tuple[Adapter, Path | None]:
    if isinstance(source, Adapter):
        return source, None
    path = Path(source)
    return load_adapter(path), (path if path.is_dir() else path.parent)


def merge_adapters(base: BaseModel, subject: str | Path | Adapter, style: str | Path | Adapter, cfg: MergeConfig,
                   out_dir: str | Path, cancel: threading.Event | None = None) -> Iterator[MergeStep]:
    """Merge a subject and a style adapter and save the result (standard file + slider parts).

    Args:
        base: the base model both adapters were trained on.
        subject: the subject adapter (folder, file or `Adapter`); float or INT8 files.
        style: the style adapter.
        cfg: method and its settings.
        out_dir: the merged adapter folder: `pytorch_lora_weights.safetensors`, `adapter.json`,
            `parts/subject/`, `parts/style/`.
        cancel: set to stop a learned merge between steps (nothing is saved then).

    Yields:
        `MergeStep` records; the last has `done` and `adapter_dir` (or `cancelled`).
    """
    out = Path(out_dir)
    subj, subj_dir = _as_adapter(subject)
    sty, sty_dir = _as_adapter(style)
    if cfg.method == "zipq" and not (subj.use_dora and sty.use_dora):
        raise ZipqError("ZipQDoRA merges two DoRA adapters; for LoRA adapters choose 'zip' (ZipLoRA).")
    started = time.time()
    extra: dict = {}
    with base.lock:
        if cfg.learned:
            last = MergeStep(0, cfg.steps)
            result = None
            for item in _learned_merge(base, subj, sty, (subj_dir, sty_dir), cfg, cancel):
                if isinstance(item, MergeStep):
                    last = item
                    if item.cancelled:
                        yield item
                        return
                    yield item
                else:
                    result = item
            parts = result
            extra = {"steps": last.step, "loss": last.loss, "loss_subject": last.loss_subject,
                     "loss_style": last.loss_style, "similarity": last.similarity}
        elif cfg.method == "direct":
            parts = direct_parts(base.pipe, subj, sty, cfg)
        elif cfg.method == "blora":
            parts = blora_parts(base.pipe, subj, sty, cfg)
        else:
            *parts, worst = dense_parts(base.pipe, subj, sty, cfg)
            extra = {"svd_relative_error_max": worst}
        seconds = time.time() - started
        info = {"format": "zipq-merged/1", "kind": "merged", "method": cfg.method, "config": asdict(cfg),
                "base": base.spec, "subject": _describe(subj), "style": _describe(sty),
                "instance_prompt": _merged_prompt(subj, sty), "merge_seconds": round(seconds, 3), **extra}
        path = save_merged(base.pipe, parts[0], parts[1], out, info)
    yield MergeStep(extra.get("steps", 0), cfg.steps if cfg.learned else 0, extra.get("loss", float("nan")),
                    elapsed=seconds, done=True, adapter_dir=out,
                    summary={**info, "adapter_bytes": path.stat().st_size})


def _describe(adapter: Adapter) -> dict:
    return {k: adapter.info.get(k) for k in ("token", "class_noun", "kind", "method", "instance_prompt")}


def _merged_prompt(subject: Adapter, style: Adapter) -> str:
    token, noun = subject.info.get("token", "sks"), subject.info.get("class_noun", "")
    return f"a photo of {token} {noun} in {style.info.get('token', 'zkz')} style".replace("  ", " ")


def save_merged(pipe, subject_part: Adapter, style_part: Adapter, out_dir: Path, info: dict) -> Path:
    """Write the merged adapter (one standard file) and its two parts (for the sliders)."""
    for name, part in (("subject", subject_part), ("style", style_part)):
        part.info = {**part.info, "part": name, "merged_into": str(out_dir)}
        save_adapter(part.detached(), out_dir / PARTS_DIR / name)
    merged = combine_parts(pipe, subject_part.detached(), style_part.detached(), info)
    return save_adapter(merged, out_dir)


@dataclass(frozen=True)
class Sliders:
    """How to generate from a merged adapter: the app's, the CLI's and the benchmark's defaults on mini.

    The subject part decides the layout at high noise; left at full strength in the late steps it paints its
    training images' flat fill over the style's texture, hence `subject_detail`. Which initial noise an image
    starts from matters more than any slider (a large shape shows its texture, a thin one cannot), hence
    `candidates`: each image is the best of several, picked by the two parts (zipq_core.rerank).

    Chosen on mini's 4 held-out pairs with bench/merge_quality.py's adapters at seeds 0 and 1 (32 images per
    setting, subject / style fidelity, seed 0 then seed 1). One candidate at 1.5/1.25: 0.735 / 0.475 and
    0.755 / 0.433 (bench/merge_schedules.py's `app` rows). With the judges' standardised evidence summed: best of
    4 at 1.5/1.25: 0.822 / 0.616 and 0.822 / 0.579; at 1.5/1.5: 0.763 / 0.667 and 0.771 / 0.599; best of 8 at
    1.5/1.5: 0.794 / 0.667 and 0.857 / 0.660, with the style judge weighted 1.5: 0.695 / 0.689 and 0.779 / 0.723.
    Then with bench/candidate_rules.py (training seeds 3 and 4, which the benchmark does not use), best of 8 at
    1.5/1.5: summed with the style judge weighted 1.25 0.687 / 0.758, the weakest judge (rerank.weakest, the
    default) 0.757 / 0.728; the same with subject detail 0.75: 0.754 / 0.660 summed, 0.816 / 0.666 weakest; best of 4,
    weakest: 0.695 / 0.722. Earlier, with one candidate (seeds 0-1): ZipQDoRA at constant 1/1 0.647 / 0.452, at
    1.5/1.25 with the subject part at half strength below the hand-off 0.773 / 0.485; the direct merge at
    constant 1/1 0.707 / 0.407.
    """

    subject: float = 1.5
    style: float = 1.5
    subject_detail: float = 0.5  # the subject part's strength below the hand-off, as a fraction of `subject`
    candidates: int = 8  # images generated per returned image on mini (see default_candidates)


def default_candidates(base: BaseModel) -> int:
    """Candidates per image the app and the CLI start with: `Sliders.candidates` on mini, 1 elsewhere.

    Every candidate costs a full generation; on mini that is a fraction of a second, on SDXL seconds to
    minutes, and the gain was measured on mini only (bench/merge_quality.py), so a real model starts at one.
    """
    return Sliders.candidates if base.is_mini else 1


def slider_adapters(merged_dir: str | Path, subject_strength: float, style_strength: float,
                    subject_detail: float = 1.0) -> list[AdapterSpec]:
    """What to pass to `generate` for a merged adapter at (subject, style) strengths; (0, 0) = the base exactly.

    `subject_detail` < 1 weakens the subject part in the late, fine-detail steps (see `Sliders`); 1 keeps the
    strengths constant, which is what the single merged file gives in any other tool. Adapters that are not
    merges (no parts) get the subject strength alone.
    """
    merged = Path(merged_dir)
    parts = merged / PARTS_DIR
    whole = not (parts / "subject").exists()
    first = detail_spec(load_adapter(merged if whole else parts / "subject"), subject_strength, subject_detail)
    return [first] if whole else [first, (load_adapter(parts / "style"), check_strength(style_strength))]


def merge_summary_json(step: MergeStep) -> str:
    return json.dumps(step.summary, indent=2, default=str)
