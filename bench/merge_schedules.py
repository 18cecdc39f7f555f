"""Generation schedules for a merged adapter: can any choice of when and where each part acts reach the bar?

A merge's two parts can be given different strengths above and below the hand-off noise level (layout vs
texture steps), different hand-offs, a negative prompt, and the subject part can be split by UNet block (e.g. its
decoder layers, where the decoder-only style adapter also acts, at their own strengths). This benchmark trains
and merges each held-out pair exactly as bench/merge_quality.py does (same seeds, so the `app` schedule
reproduces its zipq runs) and scores every schedule in SCHEDULES. It also reports the best schedule per run
chosen with the evaluator's own scores (`oracle`): an upper bound on what any per-pair automatic choice among
these schedules could reach, not a method. Prints and writes JSON:

    schedules.<name>.{subject_fidelity, style_fidelity, subject_ratio, style_ratio}   (means over runs; ratios
        of those means to the single adapters' means: the issue's bar is 0.9 on both)
    oracle.{subject_fidelity, style_fidelity, subject_ratio, style_ratio, choices}
    settings, per_run

Usage: python bench/merge_schedules.py [--pairs 4] [--seeds 2] [--images 32] [--workers 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import emit_json  # first: it puts the checkout on the import path

from merge_quality import PAIRS, add_recipe_args, merge, run_tasks, sample, score, train

from zipq_core import load_adapter
from zipq_core.adapters import PARTS_DIR, Adapter

Phase = tuple[float, float]  # strength above the hand-off (layout), below it (texture)
BAR = 0.9  # the issue's bar: ≥ 0.9× the single adapters' fidelities


@dataclass(frozen=True)
class Schedule:
    """How to generate from a run's adapters. `single` generates with one unmerged adapter at strength 1."""

    name: str
    method: str = "zipq"  # the merge whose parts are used: zipq or direct
    subject: Phase = (1.5, 0.75)
    style: Phase = (1.25, 1.25)
    handoff: float = 0.5
    negative: str = ""
    split: str = ""  # a prefix of subject-part layer names that get `split_strengths` instead of `subject`
    split_strengths: Phase = (0.0, 0.0)
    single: str = ""  # "subject" or "style": that adapter alone (the references of the ratios)


DECODER = "unet.up_blocks."
SCHEDULES = [
    Schedule("subject_only", single="subject"),
    Schedule("style_only", single="style"),
    Schedule("app"),  # config.Sliders when this ran: 1.5 / 1.25, subject detail 0.5, one candidate
    Schedule("constant_1_1", subject=(1.0, 1.0), style=(1.0, 1.0)),
    Schedule("direct_app", method="direct"),
    Schedule("style_late_only", style=(0.0, 1.5)),
    Schedule("style_early_half", style=(0.5, 1.25)),
    Schedule("style_early_half_late_1.5", style=(0.5, 1.5)),
    Schedule("subject_early_only", subject=(1.5, 0.0), style=(0.5, 1.5)),
    Schedule("subject_1.25_style_late", subject=(1.25, 0.5), style=(0.5, 1.5)),
    Schedule("handoff_0.3", style=(0.5, 1.5), handoff=0.3),
    Schedule("handoff_0.7", style=(0.5, 1.5), handoff=0.7),
    Schedule("negative_flat_fill", negative="with a flat fill"),
    Schedule("subject_decoder_weaker", subject=(1.5, 1.5), split=DECODER, split_strengths=(1.0, 0.5)),
    Schedule("subject_decoder_early_only", split=DECODER, split_strengths=(1.5, 0.0), style=(1.25, 1.5)),
    Schedule("subject_up1_early_only", subject=(1.5, 1.5), split=DECODER + "1.", split_strengths=(0.75, 0.0)),
    Schedule("subject_without_up2", subject=(1.5, 1.5), split=DECODER + "2.", split_strengths=(0.0, 0.0)),
]


def _subset(adapter: Adapter, prefix: str, inside: bool) -> Adapter:
    """The adapter's layers whose names start with `prefix` (or the others): a DoRA layer carries its own
    magnitude, so each subset is an adapter on its own."""
    layers = {k: v for k, v in adapter.layers.items() if k.startswith(prefix) == inside}
    return Adapter(layers, adapter.use_dora, dict(adapter.info))


def adapter_specs(schedule: Schedule, singles: dict[str, Adapter], parts: dict[str, tuple[Adapter, Adapter]]):
    """The (adapter, early strength, late strength) list `generate` takes for a schedule."""
    if schedule.single:
        return [(singles[schedule.single], 1.0)]
    subject, style = parts[schedule.method]
    if not schedule.split:
        return [(subject, *schedule.subject), (style, *schedule.style)]
    return [(_subset(subject, schedule.split, False), *schedule.subject),
            (_subset(subject, schedule.split, True), *schedule.split_strengths), (style, *schedule.style)]


def run_schedules(base, evaluator, subject: str, style: str, seed: int, args, work: Path) -> dict:
    """{schedule: {subject_fidelity, style_fidelity}} for one pair and seed."""
    dirs = {f"{kind}_dora": train(base, kind, name, "dora", args.steps, seed, args.lr, work / kind)
            for kind, name in (("subject", subject), ("style", style))}
    singles = {kind: load_adapter(dirs[f"{kind}_dora"]) for kind in ("subject", "style")}
    parts = {}
    for method in ("zipq", "direct"):
        merged = merge(base, method, dirs, seed, args, work)[0] / PARTS_DIR
        parts[method] = (load_adapter(merged / "subject"), load_adapter(merged / "style"))
    prompt = f"a photo of sks {subject} in zkz style"
    results = {}
    for schedule in SCHEDULES:
        images = sample(base, prompt, 1000 * seed, args.images, adapter_specs(schedule, singles, parts),
                        handoff=schedule.handoff, negative_prompt=schedule.negative)
        scores = score(images, subject, style, evaluator)
        results[schedule.name] = {k: scores[k] for k in ("subject_fidelity", "style_fidelity")}
    return {"subject": subject, "style": style, "seed": seed, "schedules": results}


def ratios(run: dict, name: str) -> tuple[float, float]:
    """A schedule's fidelities as fractions of the single adapters' (subject-only subject, style-only style)."""
    s = run["schedules"]
    return (s[name]["subject_fidelity"] / max(s["subject_only"]["subject_fidelity"], 1e-6),
            s[name]["style_fidelity"] / max(s["style_only"]["style_fidelity"], 1e-6))


def _means(rows: list[dict], reference: dict) -> dict:
    """Mean fidelities of `rows` and their ratios to the single adapters' means (the issue's bar: 0.9 on both)."""
    subject = statistics.fmean(x["subject_fidelity"] for x in rows)
    style = statistics.fmean(x["style_fidelity"] for x in rows)
    return {"subject_fidelity": subject, "style_fidelity": style,
            "subject_ratio": subject / max(reference["subject"], 1e-6),
            "style_ratio": style / max(reference["style"], 1e-6)}


def summarize(runs: list[dict]) -> tuple[dict, dict]:
    """(per-schedule means, oracle): the oracle takes, per run, the merged schedule with the largest
    min(subject ratio, style ratio), chosen with the evaluator's scores."""
    reference = {"subject": statistics.fmean(r["schedules"]["subject_only"]["subject_fidelity"] for r in runs),
                 "style": statistics.fmean(r["schedules"]["style_only"]["style_fidelity"] for r in runs)}
    table = {s.name: {**_means([r["schedules"][s.name] for r in runs], reference), "schedule": asdict(s)}
             for s in SCHEDULES}
    merged = [s.name for s in SCHEDULES if not s.single]
    choices = [max(merged, key=lambda name: min(ratios(r, name))) for r in runs]
    picked = _means([r["schedules"][c] for r, c in zip(runs, choices)], reference)
    return table, {**picked, "choices": choices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel, one process each (give each a core: the runs are CPU-bound)")
    add_recipe_args(parser)
    args = parser.parse_args()
    tasks = [(subject, style, seed) for subject, style in PAIRS[: args.pairs] for seed in range(args.seeds)]
    started = time.time()
    runs = run_tasks(run_schedules, tasks, args)
    table, best = summarize(runs)
    emit_json({"schedules": table, "oracle": best, "bar": BAR,
               "settings": vars(args) | {"out": str(args.out)}, "seconds": time.time() - started,
               "per_run": runs}, args.out)


if __name__ == "__main__":
    main()
