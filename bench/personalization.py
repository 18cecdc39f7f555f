"""Personalisation on mini: does a DoRA trained with the core's train function learn a held-out concept?

Trains a subject DoRA on a held-out subject's example set and a style DoRA on a held-out style's set (the
base model never saw either), generates with each, and reports the evaluator's accuracy on the
personalised concept. Prints JSON: subject_acc, style_acc, per-concept details, settings.

Usage: python bench/personalization.py [--subject heart] [--style hatching] [--steps 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import emit_json  # bench/ is on sys.path when a benchmark runs as a script
from merge_quality import train  # same training recipe as the merge benchmark

from zipq_core import GenerateConfig, generate, load_adapter, load_base
from zipq_core.evaluate import load_evaluator, style_fidelity, subject_fidelity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", default="heart")
    parser.add_argument("--style", default="hatching")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base, evaluator = load_base("mini"), load_evaluator()
    started = time.time()
    result = {"settings": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name, prompt in (("subject", args.subject, f"a photo of sks {args.subject}"),
                                   ("style", args.style, "a star in zkz style")):
            out = train(base, kind, name, "dora", args.steps, args.seed, args.lr, Path(tmp) / kind)
            images = generate(base, GenerateConfig(prompt=prompt, seed=args.seed, num_images=args.images),
                              [(load_adapter(out), 1.0)])
            fidelity = subject_fidelity if kind == "subject" else style_fidelity
            scores = fidelity(images, name, evaluator=evaluator)
            result[f"{kind}_acc"] = scores["acc"]
            result[kind] = {"name": name, "prompt": prompt, **scores}
    result["seconds"] = round(time.time() - started, 1)
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
