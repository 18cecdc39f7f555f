"""Which candidate to keep: rules for best-of-K generation, compared on the very same candidates.

For each held-out pair and training seed (by default seeds 3 and 4, which bench/merge_quality.py does not use,
so choosing a rule here leaves that benchmark out of sample): train subject and style DoRA and merge them with
ZipQDoRA as bench/merge_quality.py does, then generate as the app does on mini (config.Sliders) but keep every
candidate: 4 batches of 8 images × 8 rounds (round k seeded rerank.candidate_seed). For every candidate it
records both judges' evidence (rerank.evidence, the numbers the app picks by) and the evaluator's probability of
the pair's subject and style, then replays each rule's choice offline:

    weakest      rerank.weakest: the minimum of the judges' standardised evidence (the app's rule)
    sum_<w>      standardised subject evidence + w × standardised style evidence
    one          round 0 only (a plain request)
    oracle       the candidate the evaluator likes best (subject + style probability): a bound, not a method

each with all 8 rounds and with the first 4, and at subject detail 0.5 (the default) and 0.75. Prints and
writes JSON: rules.<detail>.<rule>_k<K>.{subject_fidelity, style_fidelity} (means over runs of each run's mean
over its 32 images), single.{subject_only, style_only} (each adapter alone, one candidate), settings, per_run.

Usage: python bench/candidate_rules.py [--pairs 4] [--seeds 3,4] [--workers 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import emit_json  # first: it puts the checkout on the import path

import torch
from merge_quality import PAIRS, add_recipe_args, merge, run_tasks, sample, score, train

from zipq_core import GenerateConfig, generate, load_adapter
from zipq_core.config import Sliders
from zipq_core.generation.rerank import best_of, candidate_seed, evidence, judges_for, standardised, weakest
from zipq_core.merge import slider_adapters

ROUNDS, BATCH, BATCHES = 8, 8, 4  # candidates per image, images per request, requests per run (32 images)
DETAILS = (0.5, 0.75)
SUM_WEIGHTS = (0.75, 1.0, 1.25, 1.5)


def run_pair(base, evaluator, subject: str, style: str, seed: int, args, work: Path) -> dict:
    dirs = {f"{kind}_dora": train(base, kind, name, "dora", args.steps, seed, args.lr, work / kind)
            for kind, name in (("subject", subject), ("style", style))}
    merged, seconds, _ = merge(base, "zipq", dirs, seed, args, work)
    prompt = f"a photo of sks {subject} in zkz style"
    single = {}
    for kind in ("subject", "style"):
        images = sample(base, prompt, 1000 * seed, BATCH * BATCHES, [(load_adapter(dirs[f"{kind}_dora"]), 1.0)])
        found = score(images, subject, style, evaluator)
        single[f"{kind}_only"] = {k: found[k] for k in ("subject_fidelity", "style_fidelity")}
    columns = (evaluator.classes["subject"].index(subject), evaluator.classes["style"].index(style))
    candidates = {str(detail): [candidate_record(base, evaluator, merged, prompt, 1000 * seed + k, detail, columns)
                                for k in range(BATCHES)] for detail in DETAILS}
    return {"subject": subject, "style": style, "seed": seed, "merge_seconds": seconds, "single": single,
            "candidates": candidates}


def candidate_record(base, evaluator, merged: Path, prompt: str, seed: int, detail: float,
                     columns: tuple[int, int]) -> dict:
    """One request's ROUNDS × BATCH candidates (round-major, as generate lays them out): evidence and scores."""
    sliders = Sliders()
    adapters = slider_adapters(merged, sliders.subject, sliders.style, detail)
    images = []
    for k in range(ROUNDS):
        config = GenerateConfig(prompt=prompt, seed=candidate_seed(seed, k), steps=20, num_images=BATCH)
        images += generate(base, config, adapters)
    subject_evidence, style_evidence = (evidence(base, images, judge, prompt).tolist()
                                        for judge in judges_for([spec[0] for spec in adapters]))
    probs = evaluator.predict(images)
    return {"subject_evidence": subject_evidence, "style_evidence": style_evidence,
            "subject_prob": probs["subject"][:, columns[0]].tolist(),
            "style_prob": probs["style"][:, columns[1]].tolist()}


def rule_scores(rule: str, record: dict, rounds: int) -> torch.Tensor:
    """Scores of the first `rounds` rounds' candidates under `rule` (higher = kept)."""
    n = rounds * BATCH
    subject, style = (torch.tensor(record[key][:n]) for key in ("subject_evidence", "style_evidence"))
    if rule == "weakest":
        return weakest([subject, style])
    if rule.startswith("sum_"):
        return standardised(subject) + float(rule[4:]) * standardised(style)
    if rule == "one":
        return -torch.arange(n, dtype=torch.float)  # round 0 wins every image
    if rule == "oracle":
        return torch.tensor(record["subject_prob"][:n]) + torch.tensor(record["style_prob"][:n])
    raise ValueError(rule)


def replay(runs: list[dict], detail: str, rule: str, rounds: int) -> dict:
    """Mean over runs of the kept images' mean evaluator probabilities."""
    subject, style = [], []
    for run in runs:
        kept_subject, kept_style = [], []
        for record in run["candidates"][detail]:
            kept = best_of(rule_scores(rule, record, rounds), BATCH, rounds)
            kept_subject += [record["subject_prob"][i] for i in kept]
            kept_style += [record["style_prob"][i] for i in kept]
        subject.append(statistics.fmean(kept_subject))
        style.append(statistics.fmean(kept_style))
    return {"subject_fidelity": statistics.fmean(subject), "style_fidelity": statistics.fmean(style)}


def summarise(runs: list[dict]) -> dict:
    rules = ["weakest", *(f"sum_{w}" for w in SUM_WEIGHTS), "one", "oracle"]
    table = {str(detail): {f"{rule}_k{k}": replay(runs, str(detail), rule, k) for rule in rules for k in (ROUNDS, 4)}
             for detail in DETAILS}
    single = {name: {key: statistics.fmean(r["single"][name][key] for r in runs)
                     for key in ("subject_fidelity", "style_fidelity")} for name in ("subject_only", "style_only")}
    return {"rules": table, "single": single}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seeds", default="3,4", help="training seeds, comma-separated")
    add_recipe_args(parser)
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel, one process each")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = [(subject, style, seed) for subject, style in PAIRS[: args.pairs] for seed in seeds]
    started = time.time()
    runs = run_tasks(run_pair, tasks, args)
    emit_json({**summarise(runs), "settings": vars(args) | {"out": str(args.out)}, "seconds": time.time() - started,
               "per_run": runs}, args.out)


if __name__ == "__main__":
    main()
