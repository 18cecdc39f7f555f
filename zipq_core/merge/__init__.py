"""Merging a subject adapter and a style adapter: ZipQDoRA, ZipLoRA, direct, TIES, DARE, B-LoRA; K-LoRA.

Every method produces two *parts*, a subject part and a style part, each an ordinary LoRA/DoRA
adapter, such that fusing both at strength 1 (adapters.fuse_weight) is the merged model. That gives:
- the merged file: the parts concatenated along the rank (B = [B_c | B_s], A = [A_c ; A_s]) with the
  DoRA magnitude of the fused weight, a standard adapter that diffusers' `load_lora_weights` reads;
- the sliders: the parts at strengths (w_c, w_s); (0, 0) is the base model exactly.

The methods: `parts` (exact part algebra; direct, B-LoRA), `dense` (TIES, DARE), `learned` (ZipLoRA, ZipQDoRA).
K-LoRA (`klora`) chooses each layer's adapter anew at every denoising step, so it has no parts and no file: it is a
way to generate (`klora_generate`), not a merge to save.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapters import PARTS_DIR, Adapter, import_adapter, load_adapter, save_adapter
from ..base import BaseModel, out_of_memory
from ..config import METHODS, MergeConfig, check_strength
from ..errors import ZipqError
from ..generation import AdapterSpec, detail_spec
from ..progress import MergeStep
from .dense import dense_parts
from .klora import KLoraConfig, klora_generate, klora_plan
from .learned import learned_merge
from .parts import blora_parts, combine_parts, direct_parts

__all__ = ["METHODS", "KLoraConfig", "MergeConfig", "MergeStep", "klora_generate", "klora_plan", "merge_adapters",
           "save_merged", "slider_adapters"]


def views_folder(source: str | Path) -> Path:
    """The folder an adapter's training views may be in: the adapter folder itself, or the folder of a file."""
    path = Path(source)
    return path if path.is_dir() else path.parent


def _as_adapter(source: str | Path | Adapter, base: BaseModel | None = None,
                folder: Path | None = None) -> tuple[Adapter, Path | None]:
    """An adapter and the folder its training views may be in (`folder` for an `Adapter` already read); files of
    other tools (kohya, LyCORIS, peft…) are converted against `base` (adapters.imports)."""
    if isinstance(source, Adapter):
        return source, folder
    return import_adapter(source, base), views_folder(source)


def merge_adapters(base: BaseModel, subject: str | Path | Adapter, style: str | Path | Adapter, cfg: MergeConfig,
                   out_dir: str | Path, cancel: threading.Event | None = None,
                   views: tuple[Path | None, Path | None] = (None, None)) -> Iterator[MergeStep]:
    """Merge a subject and a style adapter and save the result (standard file + slider parts).

    Args:
        base: the base model both adapters were trained on.
        subject: the subject adapter (folder, file or `Adapter`); float or INT8 files.
        style: the style adapter.
        cfg: method and its settings.
        out_dir: the merged adapter folder: `pytorch_lora_weights.safetensors`, `adapter.json`,
            `parts/subject/`, `parts/style/`.
        cancel: set to stop a learned merge between steps (nothing is saved then).
        views: for a subject or style given as an `Adapter`, the folder its training views may be in
            (`views_folder` of where it was read); a learned merge renders views where there are none.

    Yields:
        `MergeStep` records; the last has `done` and `adapter_dir` (or `cancelled`).
    """
    out = Path(out_dir)
    subj, subj_dir = _as_adapter(subject, base, views[0])
    sty, sty_dir = _as_adapter(style, base, views[1])
    if cfg.method == "zipq" and not (subj.use_dora and sty.use_dora):
        raise ZipqError("ZipQDoRA merges two DoRA adapters; for LoRA adapters choose 'zip' (ZipLoRA).")
    started = time.time()
    extra: dict = {}
    with base.lock, out_of_memory("merge with a smaller batch, or with gradient checkpointing on"):
        if cfg.learned:
            last = MergeStep(0, cfg.steps)
            result = None
            for item in learned_merge(base, subj, sty, (subj_dir, sty_dir), cfg, cancel):
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
            parts = blora_parts(base.pipe, subj, sty, cfg, base.family)
        else:
            *parts, worst = dense_parts(base.pipe, subj, sty, cfg)
            extra = {"svd_relative_error_max": worst}
        seconds = time.time() - started
        info = {"format": "zipq-merged/1", "kind": "merged", "method": cfg.method, "config": asdict(cfg),
                "base": base.spec, "subject": _describe(subj), "style": _describe(sty),
                "instance_prompt": _merged_prompt(subj, sty), "merge_seconds": round(seconds, 3), **extra}
        path = save_merged(base.pipe, parts[0], parts[1], out, info, base.adapter_dtype)
    yield MergeStep(extra.get("steps", 0), cfg.steps if cfg.learned else 0, extra.get("loss", float("nan")),
                    elapsed=seconds, done=True, adapter_dir=out,
                    summary={**info, "adapter_bytes": path.stat().st_size})


def _describe(adapter: Adapter) -> dict:
    return {k: adapter.info.get(k) for k in ("token", "class_noun", "kind", "method", "instance_prompt")}


def _merged_prompt(subject: Adapter, style: Adapter) -> str:
    token, noun = subject.info.get("token", "sks"), subject.info.get("class_noun", "")
    return f"a photo of {token} {noun} in {style.info.get('token', 'zkz')} style".replace("  ", " ")


def save_merged(pipe, subject_part: Adapter, style_part: Adapter, out_dir: Path, info: dict,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write the merged adapter (one standard file) and its two parts (for the sliders), in `dtype`."""
    for name, part in (("subject", subject_part), ("style", style_part)):
        part.info = {**part.info, "part": name}
        save_adapter(part.detached(), out_dir / PARTS_DIR / name, dtype=dtype)
    merged = combine_parts(pipe, subject_part.detached(), style_part.detached(), info)
    return save_adapter(merged, out_dir, dtype=dtype)


def slider_adapters(merged_dir: str | Path, subject_strength: float, style_strength: float,
                    subject_detail: float = 1.0) -> list[AdapterSpec]:
    """What to pass to `generate` for a merged adapter at (subject, style) strengths; (0, 0) = the base exactly.

    `subject_detail` < 1 weakens the subject part in the late, fine-detail steps (see `config.Sliders`); 1 keeps the
    strengths constant, which is what the single merged file gives in any other tool. Adapters that are not
    merges (no parts) get the subject strength alone.
    """
    merged = Path(merged_dir)
    parts = merged / PARTS_DIR
    whole = not (parts / "subject").exists()
    first = detail_spec(load_adapter(merged if whole else parts / "subject"), subject_strength, subject_detail)
    return [first] if whole else [first, (load_adapter(parts / "style"), check_strength(style_strength))]
