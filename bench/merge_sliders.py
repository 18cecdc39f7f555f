"""Direct merge vs ZipQDoRA across the strength sliders: does the learned merge move the trade-off outward?

At sliders 1/1 a merge picks one point of the subject ↔ style trade-off; an artist moves the sliders. This
benchmark trains the subject and style DoRA of each held-out pair exactly as bench/merge_quality.py does (same
seeds, so its 1/1 numbers reproduce that benchmark's runs), merges them directly and with ZipQDoRA, and scores
both at a grid of (subject strength, style strength), each with the subject part at full strength throughout
(detail 1) and at a fraction of it below the hand-off (GenerateConfig.handoff; `--details`). A merge is better
when it reaches more style at the same subject fidelity. Prints and writes JSON:

    methods.<direct|zipq>."<subject>/<style>/<detail>".{subject_fidelity, style_fidelity}   (mean over pairs)
    settings, per_pair

Usage: python bench/merge_sliders.py [--pairs 4] [--seed 0] [--details 1,0.5] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import emit_json  # first: it puts the checkout on the import path

import torch
from merge_quality import PAIRS, add_recipe_args, merge, sample, score, train

from zipq_core import load_base
from zipq_core.merge import slider_adapters
from zipq_mini.evaluator import load_evaluator

GRID = [(1.0, 1.0), (1.25, 1.0), (1.25, 1.25), (1.25, 1.5), (1.5, 1.0), (1.5, 1.25), (1.5, 1.5)]
METHODS = ("direct", "zipq")


def run_pair(base, evaluator, subject: str, style: str, args, work: Path) -> dict:
    """{method: {"s/t": {subject_fidelity, style_fidelity}}} for one pair."""
    subject_dir = train(base, "subject", subject, "dora", args.steps, args.seed, args.lr, work / "subject")
    style_dir = train(base, "style", style, "dora", args.steps, args.seed, args.lr, work / "style")
    prompt = f"a photo of sks {subject} in zkz style"
    out: dict = {}
    dirs = {"subject_dora": subject_dir, "style_dora": style_dir}
    for method in METHODS:
        merged, _, _ = merge(base, method, dirs, args.seed, args, work)
        out[method] = {}
        for (s, t), d in itertools.product(GRID, args.details):
            images = sample(base, prompt, 1000 * args.seed, args.images, slider_adapters(merged, s, t, d))
            scores = score(images, subject, style, evaluator)
            out[method][f"{s}/{t}/{d}"] = {k: scores[k] for k in ("subject_fidelity", "style_fidelity")}
    return out


def mean_over_pairs(per_pair: list[dict]) -> dict:
    return {m: {g: {k: statistics.fmean(p["methods"][m][g][k] for p in per_pair)
                    for k in ("subject_fidelity", "style_fidelity")}
                for g in per_pair[0]["methods"][m]}
            for m in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--details", type=lambda text: [float(x) for x in text.split(",")], default=[1.0, 0.5],
                        help="subject-detail fractions to score each grid point at (comma-separated)")
    add_recipe_args(parser)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    base, evaluator = load_base("mini"), load_evaluator()
    started, per_pair = time.time(), []
    for subject, style in PAIRS[: args.pairs]:
        with tempfile.TemporaryDirectory() as tmp:
            per_pair.append({"subject": subject, "style": style,
                             "methods": run_pair(base, evaluator, subject, style, args, Path(tmp))})
        print(f"{subject} × {style}: done at {time.time() - started:.0f} s", file=sys.stderr)
    emit_json({"methods": mean_over_pairs(per_pair), "settings": vars(args) | {"out": str(args.out)},
               "seconds": time.time() - started, "per_pair": per_pair}, args.out)


if __name__ == "__main__":
    main()
