"""ZipQDoRA's recipe on the tuning split: which merger settings, if any, beat the direct merge on unseen concepts?

Issue 19 asks for ZipQDoRA to beat the direct merge on the test split; on it (``bench/fidelity.py``) the default
recipe is below direct on subject fidelity. A recipe may only be chosen on the tuning split, so this benchmark
runs the test protocol's rows for recipe variants on the tuning split's pairs (``concepts.pairs("tuning", n)``),
scored by the same judge against the tuning concepts' references:

- per pair: the two concepts' example sets (5 subject, 3 style images), a subject and a style DoRA with the core's
  defaults (300 steps), then per variant a merge and two rows of 32 images from the fidelity benchmark's prompts:
  ``app`` (``config.Sliders``, the hand-off, best of mini's candidates: as the app generates) and ``file`` (the
  merged file alone at 1 / 1, one candidate: what other tools get);
- every variant's rows come from the same adapters, prompts and seeds, so variant − direct is a paired difference.

Work resumes per pair and variant (``<work>/<pair>/<variant>_{app,file}.npy``); ``--variants`` adds new ones later.

    python bench/merge_recipe.py --work runs/merge_recipe [--part 1/2] [--variants zipq,zipq_lam0]
    python bench/merge_recipe.py --work runs/merge_recipe --report bench/results/merge_recipe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common  # noqa: F401  (first: puts the checkout on the import path)
from common import concept_references, emit_json, load_mini_base

import numpy as np
from fidelity import (
    FIDELITY,
    GROUP,
    METRICS,
    PROMPT,
    bootstrap,
    concept_adapters,
    merge,
    my_tasks,
    prompts,
    sample,
    save_row,
    score_images,
)

from zipq_core import load_adapter
from zipq_core.config import FAMILY_DEFAULTS, LR_SCHEDULES, MergeConfig, Sliders
from zipq_core.merge import slider_adapters
from zipq_mini import concepts, judge

# name → MergeConfig fields over the defaults the app uses (MergeConfig()).
VARIANTS: dict[str, dict] = {
    "direct": {"method": "direct"},
    "zipq": {},  # the default recipe: cosine similarity, λ 0.01, 100 steps, lr 3e-3, magnitudes learned
    "zipq_lam0": {"lam": 0.0},  # reconstruction only
    "zipq_lam0.1": {"lam": 0.1},
    "zip_dora": {"method": "zip"},  # ZipLoRA's column mergers on the DoRA directions, magnitudes kept
    "zipq_relative": {"balance": "relative"},  # each reconstruction term relative to its adapter's effect
    "zipq_keep": {"keep_subject": 1.0},  # the subject's images under the combined prompt stay the subject
    "zipq_keep3": {"keep_subject": 3.0},
    "zipq_keep10": {"keep_subject": 10.0},
}
ROWS = ("app", "file")
SEED = 0


def tasks(per_concept: int) -> list[int]:
    return list(range(len(concepts.pairs("tuning", per_concept))))


def pair_name(pair: int, per_concept: int) -> str:
    subject, style = concepts.pairs("tuning", per_concept)[pair]
    return f"{subject.name}__{style.name}"


def run_pair(base, pair: int, variants: list[str], args) -> None:
    """Train the pair's two adapters once, then merge and generate each variant not yet done."""
    subject, style = concepts.pairs("tuning", args.per_concept)[pair]
    work = args.work / pair_name(pair, args.per_concept)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # the fidelity protocol's adapters (300 steps, a constant rate) unless told otherwise, whatever mini's defaults
    # become: cached adapters stay valid (another --steps / --lr-schedule wants its own --work folder)
    dirs = concept_adapters(base, subject, style, SEED, work, ("dora",), steps=args.steps,
                            lr_schedule=args.lr_schedule)
    groups = prompts(pair, SEED, args.images)
    app = Sliders()
    defaults = argparse.Namespace(merge_steps=MergeConfig.steps, merge_lr=MergeConfig.learning_rate)
    for variant in variants:
        if all((work / f"{variant}_{row}.npy").is_file() for row in ROWS):
            continue
        out = work / f"merged_{variant}"
        merge(base, "zipq", dirs, SEED, defaults, out, VARIANTS[variant])  # the DoRAs, whatever the method
        specs = {"app": (slider_adapters(out, app.subject, app.style, app.subject_detail),
                         FAMILY_DEFAULTS["mini"].candidates),
                 "file": ([(load_adapter(out / "pytorch_lora_weights.safetensors"), 1.0)], 1)}
        for row, (adapters, candidates) in specs.items():
            save_row(work / f"{variant}_{row}.npy", sample(base, groups, SEED, args.images, adapters, candidates))
        print(f"{work.name}: {variant} done at {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    meta = {"subject": subject.name, "style": style.name, "pair": pair, "seed": SEED, "images": args.images,
            "training": {"steps": args.steps, "lr_schedule": args.lr_schedule},
            "groups": [{"colour": c, "background": b, "prompt": PROMPT.format(colour=c, background=b)}
                       for c, b in groups]}
    (work / "pair.json").write_text(json.dumps(meta, indent=1))


def load_scores(work: Path, variants: list[str]) -> dict:
    """{pair: {"<variant>_<row>": {metric: per-image scores}}} for every pair with the direct rows."""
    j = judge.load_judge()
    from zipq_mini.evaluator import load_evaluator

    evaluator = load_evaluator()
    refs = {k: concept_references(j, "tuning", k) for k in judge.KINDS}
    out: dict = {}
    for meta_path in sorted(work.glob("*/pair.json")):
        meta = json.loads(meta_path.read_text())
        for variant in variants:
            for row in ROWS:
                path = meta_path.parent / f"{variant}_{row}.npy"
                if path.is_file():
                    out.setdefault(meta_path.parent.name, {})[f"{variant}_{row}"] = score_images(
                        np.load(path), meta["subject"], meta["style"], meta["groups"], j, refs, evaluator)
    return out


def report(scores: dict, variants: list[str], resamples: int) -> dict:
    """Per variant and row: means with intervals, and the paired difference to the direct merge's same row."""
    table, diffs = {}, {}
    for variant in variants:
        for row in ROWS:
            name = f"{variant}_{row}"
            keys = [p for p in scores if name in scores[p]]
            if not keys:
                continue
            table[name] = {m: bootstrap([scores[p][name][m] for p in keys], resamples) for m in METRICS}
            base_name = f"direct_{row}"
            paired = [p for p in keys if base_name in scores[p]]
            if variant != "direct" and paired:
                diffs[f"{name} - {base_name}"] = {
                    m: bootstrap([scores[p][name][m] - scores[p][base_name][m] for p in paired], resamples)
                    for m in METRICS}
    return {"rows": table, "differences": diffs, "pairs": sorted(scores)}


def markdown(result: dict) -> str:
    lines = ["| variant − direct (same row) | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {name} | " + " | ".join(f"{v[m]['mean']:+.3f} [{v[m]['low']:+.3f}, {v[m]['high']:+.3f}]"
                                          for m in METRICS) + " |" for name, v in result["differences"].items()]
    lines += ["", "| row | " + " | ".join(FIDELITY) + " | subject_id | style_id |", "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{v[m]['mean']:.3f}" for m in [*FIDELITY, "subject_id", "style_id"])
              + " |" for name, v in result["rows"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder of pairs' adapters and rows (resumed)")
    parser.add_argument("--part", default="1/1", help="run every n-th pair from the i-th: i/n")
    parser.add_argument("--per-concept", type=int, default=2, help="tuning pairs per concept (2: 8 pairs)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=300, help="training steps per adapter")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    parser.add_argument("--images", type=int, default=32, help=f"images per row (groups of {GROUP} per prompt)")
    parser.add_argument("--report", type=Path, default=None, help="score the finished rows into this JSON file")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    variants = ["direct", *(v for v in variants if v != "direct")]  # every difference needs the direct rows
    started = time.time()
    if args.report is None:
        import torch

        torch.set_grad_enabled(True)
        base = load_mini_base()
        for pair in my_tasks(tasks(args.per_concept), args.part):
            run_pair(base, pair, variants, args)
        return
    result = report(load_scores(args.work, variants), variants, args.resamples)
    result["seconds"] = round(time.time() - started, 1)
    result["command"] = " ".join(sys.argv[1:])
    emit_json(result, args.report)
    if args.markdown:
        args.markdown.write_text(markdown(result))


if __name__ == "__main__":
    main()
