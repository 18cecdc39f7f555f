"""`python -m zipq_core …`: the same core functions the app calls, with a progress bar and a JSON summary.

Progress goes to stderr, the JSON summary to stdout, so `… | jq` works. A `ZipqError` prints its message (no
traceback) and exits with status 2. The flags of train, merge and generate are made from the config dataclasses'
fields (config.py): each default and help text lives there only. A flag left unset takes the dataclass's
default, or for training the base family's (config.FAMILY_DEFAULTS); `--help` imports no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from . import config
from .errors import ZipqError

# Fields set from other flags or from the base model rather than as flags of their own.
GENERATE_FROM_BASE = ("width", "height")
EXPORT_FORMATS = ("comfyui", "forge", "a1111", "diffusers", "kohya", "lycoris", "int8")


def _field_type(cls: type, name: str) -> tuple[type, tuple | None]:
    """(the value type, the Literal's choices or None) of a dataclass field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return str, typing.get_args(hint)
    if args and typing.get_origin(args[0]) is typing.Literal:
        return str, typing.get_args(args[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        return args[0], None
    return (hint if isinstance(hint, type) else str), None


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                     note: str = "", decided_elsewhere: dict[str, str] | None = None) -> None:
    """One flag per field of a config dataclass: `--field-name` (or `metadata["name"]`) plus the aliases in
    `metadata["flags"]`.

    Every flag defaults to None ("not given"), so the caller can tell a choice from a default; the help shows
    the dataclass's default, or for a field in `decided_elsewhere` what decides it.
    """
    decided_elsewhere = decided_elsewhere or {}
    group = parser.add_argument_group(f"{cls.__name__} ({note or 'defaults as shown'})")
    for f in fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        kind, choices = _field_type(cls, f.name)
        names = [f.metadata.get("name") or f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ())]
        default = f.default if f.default is not MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        shown = decided_elsewhere.get(f.name, shown)
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif f.metadata.get("parse") == "targets":
            group.add_argument(*names, dest=f.name, type=config.parse_targets, default=None, metavar="TARGETS",
                               help=help_text)
        elif f.metadata.get("parse") == "list":
            group.add_argument(*names, dest=f.name, type=config.parse_list, default=None, metavar="A,B",
                               help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=kind, choices=choices, default=None, help=help_text)


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="mini", help="mini (bundled), a hub id, a diffusers folder or a .safetensors")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: fp32 on CPU, bf16/fp16 on CUDA")


def _add_plan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", action="store_true", help="print the memory plan (GB the job needs on the device, "
                   "counted from the settings) and exit; without it a job that cannot fit is refused before it starts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zipq_core", description="ZipQDoRA Studio core: train subject "
                                     "and style adapters, merge them, generate, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a subject or style adapter (LoRA/DoRA, optional quantized base)",
                       formatter_class=raw, epilog="Defaults per base family (flags override them):\n"
                       + config.family_table())
    _add_base_args(t)
    t.add_argument("--images", required=True, help="folder of training images (bad files are skipped and named)")
    t.add_argument("--out", required=True, help="output folder for the adapter")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--int8-adapter", action="store_true", help="also save an INT8 copy of the adapter")
    _add_plan_arg(t)
    family = "the base family's (table below)"
    add_config_flags(t, config.TrainConfig, note="unset flags: the defaults shown",
                     decided_elsewhere={"learning_rate": family, "rank": family, "target_modules": family,
                                        "steps": "the base family's for the --kind (table below)",
                                        "batch_size": family, "gradient_checkpointing": family,
                                        "aspect_buckets": family,
                                        "resolution": "the base model's size"})

    g = sub.add_parser("generate", help="generate images with adapters at chosen strengths")
    _add_base_args(g)
    g.add_argument("--adapter", action="append", default=[],
                   help="PATH[:STRENGTH], strength 0–1.5 (default 1); repeatable. PATH: an adapter folder or a "
                   ".safetensors file of diffusers, peft or kohya/LyCORIS (LoRA, DoRA, LoHa, LoKr)")
    g.add_argument("--merged", default=None,
                   help="a merged adapter folder, generated with its subject and style sliders (below)")
    g.add_argument("--klora", nargs=2, default=None, metavar=("SUBJECT", "STYLE"),
                   help="generate with K-LoRA from a subject and a style adapter (folders or files): each layer takes "
                   "one adapter's change, chosen anew at every step; the sliders (below) set their strengths")
    g.add_argument("--out", required=True, help="image path (several images: name_0.png, name_1.png …)")
    add_config_flags(g, config.GenerateConfig, skip=GENERATE_FROM_BASE)
    g.add_argument("--width", type=int, default=None, help="image width (default: the base model's size)")
    g.add_argument("--height", type=int, default=None, help="image height (default: the base model's size)")
    add_config_flags(g, config.Sliders, note="with --merged or --klora")
    add_config_flags(g, config.KLoraConfig, note="with --klora")
    _add_plan_arg(g)

    m = sub.add_parser("merge", help="merge a subject and a style adapter (zipq, zip, direct, ties, dare, blora)")
    _add_base_args(m)
    m.add_argument("--subject", required=True, help="subject adapter folder or .safetensors (ours, diffusers, peft, "
                   "kohya/LyCORIS LoRA, DoRA, LoHa, LoKr)")
    m.add_argument("--style", required=True, help="style adapter folder or .safetensors (any kind --subject takes)")
    m.add_argument("--out", required=True)
    _add_plan_arg(m)
    add_config_flags(m, config.MergeConfig, decided_elsewhere={"batch_size": "the base family's",
                                                          "gradient_checkpointing": "the base family's",
                                                          "blora_content": "the base family's split",
                                                          "blora_style": "the base family's split"})

    x = sub.add_parser("export", help="write an adapter for another tool (ComfyUI, A1111, Forge, diffusers, kohya, "
                       "LyCORIS) so its math gives the studio's weights within 1 %%, or as INT8")
    _add_base_args(x)
    x.add_argument("--adapter", required=True, help="adapter folder or .safetensors (an INT8 folder too)")
    # The names of adapters.export.FORMATS (a test keeps them equal; listed here so --help imports no torch).
    x.add_argument("--format", choices=EXPORT_FORMATS, default="comfyui",
                   help="the tool that will read the file; DoRA is written in that tool's own form or baked into a "
                   "plain LoRA per layer (default: comfyui)")
    x.add_argument("--bake", action="store_true", help="comfyui/forge/lycoris: write DoRA layers as a plain LoRA "
                   "too (a1111 and kohya always do)")
    x.add_argument("--out", required=True, help="a .safetensors file; int8: a folder")

    e = sub.add_parser("evaluate", help="score images of the offline world: subject / style fidelity and prompt "
                       "adherence (JSON)")
    e.add_argument("--images", required=True)
    e.add_argument("--subject-ref", default=None)
    e.add_argument("--style-ref", default=None)
    e.add_argument("--prompt", default=None)
    return parser


class _Bar:
    """A tqdm bar on stderr."""

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
    from .adapters import INT8_DIR, load_adapter, save_adapter
    from .base import load_base
    from .data import prepare_images
    from .train import train_adapter

    base = load_base(args.base, args.device or _launched_device(), args.dtype)
    given = config_values(config.TrainConfig, args)
    cfg = config.TrainConfig.for_family(base.family, **{"resolution": base.default_size, **given})
    data = config.DataConfig(resolution=cfg.resolution, buckets=cfg.aspect_buckets)
    images = prepare_images(args.images, cfg.instance_prompt, data, token=cfg.token)
    for r in images.rejected:
        print(f"skipped {r.name}: {r.reason}", file=sys.stderr)
    if (needs := _memory(args, base, "train", train=cfg, images=len(images.images))) is not None:
        return needs
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
        summary["int8_adapter"] = str(save_adapter(load_adapter(args.out), Path(args.out) / INT8_DIR, storage="int8"))
    return summary


def _memory(args: argparse.Namespace, base, stage: str, **settings) -> dict | None:
    """With --plan: the job's memory plan, to print instead of running. Otherwise None, or a `ZipqError` when the
    job cannot fit the device (raised before anything runs)."""
    from .plan import check_fits, plan_memory

    needs = plan_memory(base, stage, **settings)
    if args.plan:
        return {"plan": needs.as_dict(), "summary": needs.describe()}
    check_fits(needs)
    return None


def _launched_device() -> str | None:
    """Under `accelerate launch`, each process takes the GPU of its local rank."""
    import os

    import torch

    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{rank}" if rank is not None and torch.cuda.is_available() else None


def cmd_generate(args: argparse.Namespace) -> dict:
    from .base import load_base
    from .generation import generate, load_adapters
    from .merge import slider_adapters

    if args.klora and (args.merged or args.adapter):
        raise ZipqError("--klora generates from its two adapters alone: leave out --merged and --adapter.")
    klora_cfg = config.KLoraConfig(**config_values(config.KLoraConfig, args))
    sliders = config.Sliders(**config_values(config.Sliders, args))
    given = config_values(config.GenerateConfig, args)
    # Every value given is checked before the base loads (slow for a full-size model); the smallest valid side
    # stands in for the base's own size, not known yet.
    side = config.MIN_SIDE
    config.GenerateConfig(**{"width": args.width or side, "height": args.height or side, **given})
    base = load_base(args.base, args.device, args.dtype)
    size = base.default_size
    if "candidates" not in given and (args.merged or args.klora):  # judged by its parts: the family's best-of-K
        given["candidates"] = config.family_defaults(base.family).candidates
    cfg = config.GenerateConfig(**{"width": args.width or size, "height": args.height or size, **given})
    adapters = load_adapters(args.adapter, base)
    schedule = None
    if args.merged:
        adapters += slider_adapters(args.merged, sliders.subject, sliders.style, sliders.subject_detail)
    if args.klora:
        from .merge import klora_plan

        plan = klora_plan(base, *args.klora, sliders, klora_cfg)
        adapters, schedule = plan.adapters, plan.schedule
    if (needs := _memory(args, base, "generate", generate=cfg, adapters=len(adapters),
                         train=config.TrainConfig.for_family(base.family))) is not None:
        return needs
    bar = _Bar(cfg.steps * cfg.candidates, "generate")
    started = time.time()
    try:  # generate reports the true total (one round when no adapter is active, plus judging)
        images = generate(base, cfg, adapters, on_step=lambda i, n: bar.update_to(i, total=n), schedule=schedule)
    finally:
        bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
                                            for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return {"images": [str(p) for p in paths], "seconds": round(time.time() - started, 2),
            "candidates": cfg.candidates,
            "adapters": [{"path": a, "strength": s} for a, s in zip(args.adapter, [s[1] for s in adapters])],
            **({"merged": {"path": args.merged, "subject_strength": sliders.subject, "style_strength": sliders.style,
                           "subject_detail": sliders.subject_detail, "handoff": cfg.handoff}} if args.merged else {}),
            **({"klora": _klora_summary(args.klora, plan.scores, cfg, sliders, klora_cfg)} if args.klora else {})}


def _klora_summary(paths: Sequence[str], scores, cfg: config.GenerateConfig, sliders: config.Sliders,
                   klora_cfg: config.KLoraConfig) -> dict:
    """The K-LoRA request and how many layers the subject holds at the first and the last step."""
    from .merge.klora import winners_table

    table = winners_table(scores, cfg.steps, klora_cfg)
    return {"subject": paths[0], "style": paths[1], "subject_strength": sliders.subject,
            "style_strength": sliders.style, "subject_detail": sliders.subject_detail, "handoff": cfg.handoff,
            "top_k": klora_cfg.top_k, "alpha": klora_cfg.alpha, "beta": klora_cfg.beta, "gamma": scores.gamma,
            "layers": len(scores.keys), "subject_layers_first_step": int(table[0].sum()),
            "subject_layers_last_step": int(table[-1].sum())}


def cmd_merge(args: argparse.Namespace) -> dict:
    from .adapters import import_adapter
    from .base import load_base
    from .merge import merge_adapters, views_folder

    if args.method == "klora":  # refused before the base is loaded: nothing to write
        raise ZipqError(config.KLORA_HAS_NO_FILE)
    base = load_base(args.base, args.device, args.dtype)
    cfg = config.MergeConfig.for_family(base.family, **config_values(config.MergeConfig, args))
    subject, style = (import_adapter(p, base) for p in (args.subject, args.style))  # read once: plan and merge
    params = max(subject.num_params(), style.num_params())
    if (needs := _memory(args, base, "merge", merge=cfg, adapter_params=params)) is not None:
        return needs
    bar = _Bar(cfg.steps if cfg.learned else 1, f"merge {cfg.method}")
    last = None
    try:
        for last in merge_adapters(base, subject, style, cfg, args.out,
                                   views=(views_folder(args.subject), views_folder(args.style))):
            bar.update_to(last.step if not last.done or cfg.learned else 1, loss=f"{last.loss:.4f}")
    finally:
        bar.close()
    return {"adapter": str(Path(args.out).resolve()), **last.summary}


def cmd_export(args: argparse.Namespace) -> dict:
    from .adapters import import_adapter
    from .adapters.export import export_adapter
    from .base import load_base

    base = load_base(args.base, args.device, args.dtype)
    adapter = import_adapter(args.adapter, base)  # our folders, INT8 folders and every file `import_adapter` reads
    return export_adapter(adapter, base, args.format, args.out, bake=args.bake).as_dict()


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from zipq_mini.evaluator import evaluate_images  # the offline world's evaluator: images of mini only

    from .evaluate import load_images

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
