"""Personalisation on mini: does a DoRA trained with the core's train function learn a held-out concept?

For every held-out subject and style example set (the base model never saw any of them), trains a DoRA with
the core's defaults (`TrainConfig`: full targets, timestep bias by kind, captions from the sidecar files),
generates with it and scores the personalised concept with the evaluator. Prints JSON:

    subject_acc, style_acc            mean accuracy over the concepts (the issue's bar: ≥ 0.70 each)
    subject_prob, style_prob          mean probability of the concept's class
    subjects.<name>, styles.<name>    per concept: acc, prob, train seconds
    settings, seconds

Usage: python bench/personalization.py [--subjects heart,moon,…] [--styles hatching,…] [--steps 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import emit_json  # bench/ is on sys.path when a benchmark runs as a script

from merge_quality import train  # same training recipe as the merge benchmark

from zipq_core import GenerateConfig, TrainConfig, generate, load_adapter, load_base
from zipq_mini import world
from zipq_mini.evaluator import load_evaluator, style_fidelity, subject_fidelity

STYLE_PROMPT = "a star in zkz style"  # a base subject, so only the style is new


def personalise(base, evaluator, kind: str, name: str, args, work: Path) -> dict:
    """Train one adapter on an example set and score 16 generations of its concept."""
    started = time.time()
    out = train(base, kind, name, "dora", args.steps, args.seed, args.lr, work / f"{kind}_{name}")
    trained = time.time() - started
    prompt = f"a photo of sks {name}" if kind == "subject" else STYLE_PROMPT
    images = generate(base, GenerateConfig(prompt=prompt, seed=args.seed, num_images=args.images),
                      [(load_adapter(out), 1.0)])
    fidelity = subject_fidelity if kind == "subject" else style_fidelity
    scores = fidelity(images, name, evaluator=evaluator)
    return {"prompt": prompt, "acc": scores["acc"], "prob": round(scores["prob"], 4), "train_s": round(trained, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default=",".join(world.HELDOUT_SUBJECTS))
    parser.add_argument("--styles", default=",".join(world.HELDOUT_STYLES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base, evaluator = load_base("mini"), load_evaluator()
    started = time.time()
    result: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, names in (("subject", args.subjects), ("style", args.styles)):
            rows = {n: personalise(base, evaluator, kind, n, args, Path(tmp)) for n in names.split(",") if n}
            result[f"{kind}s"] = rows
            if rows:
                result[f"{kind}_acc"] = statistics.fmean(r["acc"] for r in rows.values())
                result[f"{kind}_prob"] = statistics.fmean(r["prob"] for r in rows.values())
    result["seconds"] = round(time.time() - started, 1)
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
