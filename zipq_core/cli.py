"""`python -m zipq_core …`: the same core functions the app calls, with a progress bar and a JSON summary.

Progress goes to stderr, the JSON summary to stdout, so `… | jq` works. A `ZipqError` prints its
message (no traceback) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import ZipqError


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="mini",
                   help="mini (bundled), a hub id, a diffusers folder or a .safetensors file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: fp32 on CPU, bf16/fp16 on CUDA")


def build_parser() -> argparse.ArgumentParser:
    from .config import TARGET_BLOCKS, TARGET_PRESETS, TIMESTEP_BIASES, GenerateConfig
    from .merge import Sliders

    sliders = Sliders()  # the merged adapter's defaults, the same as the app's

    parser = argparse.ArgumentParser(prog="python -m zipq_core", description="ZipQDoRA Studio core: train subject "
                                     "and style adapters, merge them, generate, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a subject or style adapter (LoRA/DoRA, optional quantized base)")
    _add_base_args(t)
    t.add_argument("--images", required=True, help="folder of training images (bad files are skipped and named)")
    t.add_argument("--kind", choices=["subject", "style"], default="subject")
    t.add_argument("--token", default="sks", help="rare word naming the concept, e.g. sks (subject) or zkz (style)")
    t.add_argument("--class-noun", default="", help="what the subject is (dog, mug) / what a style image shows")
    t.add_argument("--method", choices=["dora", "lora"], default="dora")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=None, help="default: = rank")
    t.add_argument("--targets", default="full", help=f"a preset ({', '.join(TARGET_PRESETS)}) or comma-separated "
                   "module suffixes (default: full; 'attention' is the usual SDXL choice)")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate (mini: 3e-3; 1e-4 is usual for SDXL)")
    t.add_argument("--target-blocks", choices=TARGET_BLOCKS, default="auto",
                   help="UNet blocks to adapt (auto: all for a subject, the decoder half for a style)")
    t.add_argument("--timestep-bias", choices=TIMESTEP_BIASES, default="auto",
                   help="noise levels to favour (auto: high_noise for a subject, uniform for a style)")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch", type=int, default=2)
    t.add_argument("--resolution", type=int, default=None, help="default: the base model's native size")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--prior-preservation", action="store_true")
    t.add_argument("--quantize-base", choices=["none", "int8", "nf4"], default="none",
                   help="QDoRA: 8/4-bit frozen base")
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--int8-adapter", action="store_true", help="also save an INT8 copy of the adapter")
    t.add_argument("--out", required=True, help="output folder for the adapter")

    g = sub.add_parser("generate", help="generate images with adapters at chosen strengths")
    _add_base_args(g)
    g.add_argument("--adapter", action="append", default=[],
                   help="PATH[:STRENGTH], strength 0–1.5 (default 1); repeatable")
    g.add_argument("--merged", default=None,
                   help="a merged adapter folder, generated with its subject and style sliders (below)")
    g.add_argument("--subject-strength", type=float, default=sliders.subject,
                   help="merged adapter: subject part strength")
    g.add_argument("--style-strength", type=float, default=sliders.style, help="merged adapter: style part strength")
    g.add_argument("--subject-detail", type=float, default=sliders.subject_detail,
                   help="merged adapter: the subject part's strength below the hand-off, as a fraction "
                        "(1 = constant strengths, as the merged file gives in other tools)")
    g.add_argument("--handoff", type=float, default=GenerateConfig.handoff,
                   help="noise level (0–1) below which the detail strength applies")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--candidates", type=int, default=None,
                   help="images generated per returned image, the best picked by the adapters themselves "
                        f"(default: with --merged on mini {sliders.candidates}, else 1)")
    g.add_argument("--out", required=True, help="image path (several images: name_0.png, name_1.png …)")

    m = sub.add_parser("merge", help="merge a subject and a style adapter (zipq, zip, direct, ties, dare, blora)")
    _add_base_args(m)
    m.add_argument("--subject", required=True, help="subject adapter folder or .safetensors")
    m.add_argument("--style", required=True, help="style adapter folder or .safetensors")
    m.add_argument("--method", default="zipq", choices=["zipq", "zip", "direct", "ties", "dare", "blora"])
    m.add_argument("--steps", type=int, default=100, help="learned methods: merger steps (≤ 100 is ZipLoRA's budget)")
    m.add_argument("--lr", type=float, default=3e-3, help="merger learning rate")
    m.add_argument("--lam", type=float, default=0.01, help="λ of the merger-similarity term")
    m.add_argument("--similarity", choices=["product", "cosine"], default="cosine",
                   help="merger-similarity term: mean|m_c⊙m_s| (product) or |cos(m_c, m_s)| (ZipLoRA paper)")
    m.add_argument("--subject-weight", type=float, default=1.0)
    m.add_argument("--style-weight", type=float, default=1.0)
    m.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction kept")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)

    x = sub.add_parser("export", help="write an adapter for other tools: kohya/A1111/ComfyUI, or INT8")
    _add_base_args(x)
    x.add_argument("--adapter", required=True, help="adapter folder or .safetensors")
    x.add_argument("--format", choices=["kohya", "int8"], default="kohya")
    x.add_argument("--bake", action="store_true", help="kohya: turn DoRA into a plain LoRA (widest compatibility)")
    x.add_argument("--out", required=True, help="kohya: a .safetensors file; int8: a folder")

    e = sub.add_parser("evaluate", help="score images: subject / style fidelity and prompt adherence (JSON)")
    e.add_argument("--images", required=True)
    e.add_argument("--subject-ref", default=None)
    e.add_argument("--style-ref", default=None)
    e.add_argument("--prompt", default=None)
    return parser


class _Bar:
    """A tqdm bar on stderr (no-op when tqdm is missing or stderr is not wanted)."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update_to(self, n: int, total: int | None = None, **postfix) -> None:
        if total is not None:
            self.bar.total = total
        self.bar.n = n
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def cmd_train(args: argparse.Namespace) -> dict:
    from .base import load_base
    from .config import TrainConfig, parse_targets
    from .data import DataConfig, prepare_images
    from .train import train_adapter

    base = load_base(args.base, args.device or _launched_device(), args.dtype)
    resolution = args.resolution or base.default_size
    cfg = TrainConfig(kind=args.kind, token=args.token, class_noun=args.class_noun, method=args.method,
                      rank=args.rank, alpha=args.alpha, target_modules=parse_targets(args.targets),
                      learning_rate=args.lr, steps=args.steps, batch_size=args.batch, resolution=resolution,
                      seed=args.seed, prior_preservation=args.prior_preservation, quantize_base=args.quantize_base,
                      checkpoint_every=args.checkpoint_every, timestep_bias=args.timestep_bias,
                      target_blocks=args.target_blocks)
    images = prepare_images(args.images, cfg.instance_prompt, DataConfig(resolution=resolution), token=cfg.token)
    for r in images.rejected:
        print(f"skipped {r.name}: {r.reason}", file=sys.stderr)
    bar = _Bar(cfg.steps, f"train {cfg.kind} {cfg.method}")
    last = None
    try:
        for last in train_adapter(base, images, cfg, args.out, resume=args.resume, info={"base": args.base}):
            bar.update_to(last.step, loss=f"{last.loss:.4f}", eta=f"{last.eta:.0f}s")
    finally:
        bar.close()
    summary = {"adapter": str(Path(args.out).resolve()), "steps": last.step, "final_loss": last.loss,
               "train_seconds": round(last.elapsed, 2), "images": len(images.images),
               "rejected": [{"file": r.name, "reason": r.reason} for r in images.rejected]}
    if args.int8_adapter:
        from .adapters import load_adapter
        from .quantize import save_adapter_int8

        summary["int8_adapter"] = str(save_adapter_int8(load_adapter(args.out), Path(args.out) / "int8"))
    return summary


def _launched_device() -> str | None:
    """Under `accelerate launch`, each process takes the GPU of its local rank."""
    import os

    import torch

    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{rank}" if rank is not None and torch.cuda.is_available() else None


def cmd_generate(args: argparse.Namespace) -> dict:
    from .base import load_base
    from .config import GenerateConfig
    from .generate import generate, load_adapters
    from .merge import default_candidates

    base = load_base(args.base, args.device, args.dtype)
    size = base.default_size
    candidates = args.candidates if args.candidates is not None else (default_candidates(base) if args.merged else 1)
    cfg = GenerateConfig(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                         guidance=args.guidance, width=args.width or size, height=args.height or size,
                         num_images=args.num_images, handoff=args.handoff, candidates=candidates)
    adapters = load_adapters(args.adapter)
    if args.merged:
        from .merge import slider_adapters

        adapters += slider_adapters(args.merged, args.subject_strength, args.style_strength, args.subject_detail)
    bar = _Bar(cfg.steps * cfg.candidates, "generate")
    started = time.time()
    try:  # generate reports the true total (one round when no adapter is active)
        images = generate(base, cfg, adapters, on_step=lambda i, n: bar.update_to(i, total=n))
    finally:
        bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
                                            for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return {"images": [str(p) for p in paths], "seconds": round(time.time() - started, 2), "candidates": candidates,
            "adapters": [{"path": a, "strength": s} for a, s in zip(args.adapter, [s[1] for s in adapters])],
            **({"merged": {"path": args.merged, "subject_strength": args.subject_strength,
                           "style_strength": args.style_strength, "subject_detail": args.subject_detail,
                           "handoff": args.handoff}} if args.merged else {})}


def cmd_merge(args: argparse.Namespace) -> dict:
    from .base import load_base
    from .merge import MergeConfig, merge_adapters

    base = load_base(args.base, args.device, args.dtype)
    cfg = MergeConfig(method=args.method, steps=args.steps, learning_rate=args.lr, lam=args.lam, seed=args.seed,
                      similarity=args.similarity,
                      subject_weight=args.subject_weight, style_weight=args.style_weight, density=args.density)
    bar = _Bar(cfg.steps if cfg.learned else 1, f"merge {cfg.method}")
    last = None
    try:
        for last in merge_adapters(base, args.subject, args.style, cfg, args.out):
            bar.update_to(last.step if not last.done or cfg.learned else 1, loss=f"{last.loss:.4f}")
    finally:
        bar.close()
    return {"adapter": str(Path(args.out).resolve()), **last.summary}


def cmd_export(args: argparse.Namespace) -> dict:
    from .adapters import load_adapter

    adapter = load_adapter(args.adapter)
    if args.format == "int8":
        from .quantize import save_adapter_int8

        path = save_adapter_int8(adapter, args.out)
        return {"path": str(path), "bytes": path.stat().st_size}
    from .base import load_base
    from .export import export_kohya

    report = export_kohya(adapter, load_base(args.base, args.device, args.dtype), args.out, bake=args.bake)
    return {"path": str(report.path), "bytes": report.path.stat().st_size, "layers": report.layers,
            "baked": report.baked, "max_relative_error": report.max_relative_error}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from .evaluate import evaluate_images, load_images

    refs = {k: load_images(v) if v else None for k, v in (("subject", args.subject_ref), ("style", args.style_ref))}
    return evaluate_images(load_images(args.images), subject_ref=refs["subject"], style_ref=refs["style"],
                           prompt=args.prompt)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "merge": cmd_merge, "export": cmd_export,
            "evaluate": cmd_evaluate}


def _quiet_libraries() -> None:
    """Library progress bars and deprecation chatter would drown the CLI's own bar."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its optional-kernel notice at import time
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        summary = COMMANDS[args.command](args)
    except ZipqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2, default=str))
    return 0
