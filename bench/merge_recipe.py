"""ZipQDoRA's recipe on the tuning split: which merger settings, if any, beat the direct merge on unseen concepts?

Issue 19 asks for ZipQDoRA to beat the direct merge on the test split; on it (``bench/fidelity.py``) the default
recipe is below direct on subject fidelity. A recipe may only be chosen on the tuning split, so this benchmark
runs the test protocol's rows for recipe variants on the tuning split's pairs (``concepts.pairs("tuning", n)``),
scored by the same judge against the tuning concepts' references:

- per pair: the two concepts' example sets (5 subject, 3 style images), a subject and a style DoRA (300 steps at a
  constant rate unless told otherwise), then per variant a merge and two rows of 32 images from the fidelity
  benchmark's prompts: ``app_S_T_D`` at the default ``config.Sliders`` (subject S, style T, subject detail D; the
  hand-off, best of mini's candidates: as the app generates; runs before the rows were named by their sliders
  called it ``app``) and ``file`` (the merged file alone at 1 / 1, one candidate: what other tools get);
- every variant's rows come from the same adapters, prompts and seeds, so variant − direct is a paired difference.

``--sliders S/T/D,…`` adds an app row per variant at each of those generation sliders (subject strength, style
strength, subject detail; row ``app_S_T_D``) beside the default's, so that the sliders can be chosen again when the
adapters change; ``--singles`` adds each pair's single adapters at strength 1 with the app's candidates (rows
``subject_only_app`` and ``style_only_app``, as in the test protocol): what a merge should keep.

Work resumes per pair, variant and row (``<work>/<pair>/<variant>_<row>.npy``); ``--variants`` and ``--sliders`` add
new ones later.

    python bench/merge_recipe.py --work runs/merge_recipe [--part 1/2] [--variants zipq,zipq_lam0]
        [--sliders 1.5/1.5/1,1/1/1] [--singles] [--steps 3000 --style-steps 300 --lr-schedule cosine]
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
    row_adapters,
    sample,
    save_row,
    score_images,
)

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
    "zipq_geometric": {"balance": "geometric"},  # each reconstruction term relative to its own current value
    "zipq_keep": {"keep_subject": 1.0},  # the subject's images under the combined prompt stay the subject
    "zipq_keep3": {"keep_subject": 3.0},
    "zipq_keep10": {"keep_subject": 10.0},
}
ROWS = ("app", "file")  # "app": a single adapter's row, or a merge's at the sliders of the time (older runs)
SINGLES = ("subject_only", "style_only")  # pseudo-variants: one adapter at strength 1, an app row only
SEED = 0


def slider_row(sliders: Sliders) -> str:
    """The app row generated at these sliders: "app_<subject>_<style>_<detail>" (the default's too, so that a
    row stays what it was when the defaults change)."""
    return "app_" + "_".join(f"{v:g}" for v in (sliders.subject, sliders.style, sliders.subject_detail))


def slider_rows(text: str) -> dict[str, Sliders]:
    """"1.5/1.5/1,1/1/1" → {"app_1.5_1.5_1": Sliders(1.5, 1.5, 1.0), …}; each value checked by Sliders."""
    out = {}
    for item in filter(None, text.split(",")):
        values = [float(v) for v in item.split("/")]
        if len(values) != 3:
            raise SystemExit(f"--sliders takes subject/style/detail triples, not {item!r}")
        sliders = Sliders(*values)
        out[slider_row(sliders)] = sliders
    return out


def tasks(per_concept: int) -> list[int]:
    return list(range(len(concepts.pairs("tuning", per_concept))))


def pair_name(pair: int, per_concept: int) -> str:
    subject, style = concepts.pairs("tuning", per_concept)[pair]
    return f"{subject.name}__{style.name}"


def run_pair(base, pair: int, variants: list[str], args) -> None:
    """Train the pair's two adapters once, then merge and generate each variant's rows not yet done."""
    subject, style = concepts.pairs("tuning", args.per_concept)[pair]
    work = args.work / pair_name(pair, args.per_concept)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # the fidelity protocol's adapters (300 steps, a constant rate) unless told otherwise, whatever mini's defaults
    # become: cached adapters stay valid (another --steps / --lr-schedule wants its own --work folder)
    dirs = concept_adapters(base, subject, style, SEED, work, ("dora",), steps=args.steps,
                            style_steps=args.style_steps, lr_schedule=args.lr_schedule)
    groups = prompts(pair, SEED, args.images)
    best_of = FAMILY_DEFAULTS["mini"].candidates
    app_rows = {slider_row(Sliders()): Sliders(), **slider_rows(args.sliders)}
    defaults = argparse.Namespace(merge_steps=MergeConfig.steps, merge_lr=MergeConfig.learning_rate)

    def done(name: str) -> bool:
        return (work / f"{name}.npy").is_file()

    def generate_row(name: str, adapters, candidates: int) -> None:
        save_row(work / f"{name}.npy", sample(base, groups, SEED, args.images, adapters, candidates))
        print(f"{work.name}: {name} done at {time.time() - started:.0f} s", file=sys.stderr, flush=True)

    for single in SINGLES if args.singles else ():
        if not done(f"{single}_app"):  # the test protocol's own row: the adapter at 1 with the app's candidates
            generate_row(f"{single}_app", *row_adapters(base, single, dirs, {})[:2])
    for variant in variants:
        names = [f"{variant}_{row}" for row in (*app_rows, "file")]
        if all(done(n) for n in names):
            continue
        out = work / f"merged_{variant}"
        merged = merge(base, "zipq", dirs, SEED, defaults, out, VARIANTS[variant])  # the DoRAs whatever the method
        for row, sliders in app_rows.items():
            if not done(f"{variant}_{row}"):
                generate_row(f"{variant}_{row}", slider_adapters(out, sliders.subject, sliders.style,
                                                                 sliders.subject_detail), best_of)
        if not done(f"{variant}_file"):  # the test protocol's own file row: the merged file at 1, one candidate
            generate_row(f"{variant}_file", *row_adapters(base, f"{variant}_file", dirs, {variant: merged})[:2])
    meta = {"subject": subject.name, "style": style.name, "pair": pair, "seed": SEED, "images": args.images,
            "training": {"steps": args.steps, "style_steps": args.style_steps, "lr_schedule": args.lr_schedule},
            "groups": [{"colour": c, "background": b, "prompt": PROMPT.format(colour=c, background=b)}
                       for c, b in groups]}
    (work / "pair.json").write_text(json.dumps(meta, indent=1))


def row_of(variant: str, stem: str) -> str | None:
    """The row of a variant's file stem ("zipq_app_1.5_1.5_1" → "app_1.5_1.5_1"), None when it is another's."""
    row = stem[len(variant) + 1:] if stem.startswith(f"{variant}_") else ""
    return row if row in ROWS or row.startswith("app_") else None


def load_scores(work: Path, variants: list[str]) -> dict:
    """{pair: {"<variant>_<row>": {metric: per-image scores}}} of every finished row of these variants (and of the
    single adapters) in every pair."""
    j = judge.load_judge()
    from zipq_mini.evaluator import load_evaluator

    evaluator = load_evaluator()
    refs = {k: concept_references(j, "tuning", k) for k in judge.KINDS}
    out: dict = {}
    for meta_path in sorted(work.glob("*/pair.json")):
        meta = json.loads(meta_path.read_text())
        for path in sorted(meta_path.parent.glob("*.npy")):
            if path.stem.endswith(".tmp") or not any(row_of(v, path.stem) for v in (*SINGLES, *variants)):
                continue
            out.setdefault(meta_path.parent.name, {})[path.stem] = score_images(
                np.load(path), meta["subject"], meta["style"], meta["groups"], j, refs, evaluator)
    return out


def report(scores: dict, variants: list[str], resamples: int) -> dict:
    """Per variant and row: means with intervals; paired differences to the direct merge's same row (and a recipe's
    to the default zipq's), and, for a slider row, to the variant's row at the default sliders; and (with the
    single adapters' rows) the fraction of each single adapter's fidelity the row keeps (ratio of means)."""
    names = {name for pair in scores.values() for name in pair}
    default = slider_row(Sliders())
    table, diffs, keeps = {}, {}, {}
    for variant in (*SINGLES, *variants):
        for name in sorted(names):
            row = row_of(variant, name)
            if row is None:
                continue
            keys = [p for p in scores if name in scores[p]]
            table[name] = {m: bootstrap([scores[p][name][m] for p in keys], resamples) for m in METRICS}
            # against the direct merge (and a recipe against the default zipq) at the same sliders, and another
            # slider row against the default's
            for other in ([f"direct_{row}"] if variant not in ("direct", *SINGLES) else []) \
                    + ([f"zipq_{row}"] if variant not in ("direct", "zipq", *SINGLES) else []) \
                    + ([f"{variant}_{default}"] if row.startswith("app_") and row != default else []):
                paired = [p for p in keys if other in scores[p]]
                if paired:
                    diffs[f"{name} - {other}"] = {
                        m: bootstrap([scores[p][name][m] - scores[p][other][m] for p in paired], resamples)
                        for m in METRICS}
    for name in (n for n in table if n not in {f"{single}_app" for single in SINGLES}):
        keeps[name] = {f"{kind}_fidelity": round(table[name][f"{kind}_fidelity"]["mean"]
                                                 / table[f"{kind}_only_app"][f"{kind}_fidelity"]["mean"], 3)
                       for kind in ("subject", "style") if f"{kind}_only_app" in table}
    return {"rows": table, "differences": diffs, "keeps": {k: v for k, v in keeps.items() if v},
            "pairs": sorted(scores)}


def markdown(result: dict) -> str:
    lines = ["| paired difference | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {name} | " + " | ".join(f"{v[m]['mean']:+.3f} [{v[m]['low']:+.3f}, {v[m]['high']:+.3f}]"
                                          for m in METRICS) + " |" for name, v in result["differences"].items()]
    lines += ["", "| row | " + " | ".join(FIDELITY) + " | subject_id | style_id | keeps (subject / style) |",
              "|---|---|---|---|---|---|"]
    for name, v in result["rows"].items():
        keeps = result["keeps"].get(name, {})
        kept = " / ".join(f"{keeps[m]:.2f}×" for m in FIDELITY if m in keeps)
        lines.append(f"| {name} | " + " | ".join(f"{v[m]['mean']:.3f}" for m in [*FIDELITY, "subject_id", "style_id"])
                     + f" | {kept} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder of pairs' adapters and rows (resumed)")
    parser.add_argument("--part", default="1/1", help="run every n-th pair from the i-th: i/n")
    parser.add_argument("--per-concept", type=int, default=2, help="tuning pairs per concept (2: 8 pairs)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=300, help="training steps per adapter")
    parser.add_argument("--style-steps", type=int, default=None, help="the style adapter's steps (default: --steps)")
    parser.add_argument("--sliders", default="", help="more app rows at these subject/style/detail triples "
                                                    "(comma-separated, e.g. 1.5/1.5/1,1/1/1)")
    parser.add_argument("--singles", action="store_true", help="also each single adapter's app row")
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
    slider_rows(args.sliders)  # a bad triple stops here, before any training
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
