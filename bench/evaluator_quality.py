"""Benchmark: the offline evaluator's accuracy on freshly rendered test images (every subject and style).

    python bench/evaluator_quality.py [--n 2000] [--seed 987654] [--out FILE]

Prints (and writes to FILE) JSON with ``subject_acc``, ``style_acc``, ``colour_acc`` on clean renders of a seed
the evaluator was never trained on, the same on held-out subjects/styles only (``heldout``), and on degraded
copies (blur, noise, JPEG: ``degraded``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import emit_json  # bench/ is on sys.path when a benchmark runs as a script

import numpy as np
import torch

from zipq_mini import evaluator, world


def measure(n: int, seed: int, held_out, degraded: bool = False) -> dict[str, float]:
    """Accuracy per head on n fresh renders (optionally degraded like a small VAE would)."""
    imgs, scenes = world.render_dataset(n, seed, held_out)
    if degraded:
        from PIL import Image, ImageFilter

        rng = np.random.default_rng(seed)
        out = []
        for a in imgs:
            im = Image.fromarray(a).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.0))))
            b = np.asarray(im, dtype=np.float32) + rng.normal(0, 6, a.shape)
            out.append(np.clip(b, 0, 255).astype(np.uint8))
        imgs = np.stack(out)
    acc = evaluator.accuracy(evaluator.load_evaluator(), imgs, world.labels(scenes))
    return {f"{k}_acc": round(v, 4) for k, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=987_654)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    res = measure(a.n, a.seed, "any")
    res["n"] = a.n
    res["heldout"] = measure(a.n // 2, a.seed + 1, True)
    res["degraded"] = measure(a.n // 2, a.seed + 2, "any", degraded=True)
    res["seconds"] = round(time.time() - t0, 1)
    emit_json(res, Path(a.out) if a.out else None)


if __name__ == "__main__":
    main()
