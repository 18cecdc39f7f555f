"""Benchmark: how well the bundled mini model draws in-distribution prompts, and how fast.

    python bench/mini_quality.py [--n 200] [--steps 20] [--guidance 5.0] [--threads 2] [--out FILE] [--grid PNG]

Seeded prompts from the base world (subjects, styles, colours the model was trained on), one 64 px image each;
the offline evaluator scores them. JSON keys: ``subject_acc``, ``style_acc``, ``colour_acc``, ``sec_per_image``
(median wall time of one pipeline call: text encoding, 20 steps with CFG, VAE decode).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import emit_json  # bench/ is on sys.path when a benchmark runs as a script

import torch

from zipq_mini import evaluator, pipeline


def save_grid(images, prompts, path: str, cols: int = 8) -> None:
    """A grid of images with their prompt under each (small font, wrapped)."""
    from PIL import Image, ImageDraw

    cell_w, cell_h = 128, 128 + 40
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, p) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        sheet.paste(im.resize((128, 128), Image.Resampling.NEAREST), (x, y))
        words, lines, cur = p.split(), [], ""
        for w in words:
            if len(cur) + len(w) + 1 > 24:
                lines.append(cur)
                cur = w
            else:
                cur = (cur + " " + w).strip()
        lines.append(cur)
        for j, line in enumerate(lines[:3]):
            draw.text((x + 2, y + 130 + 12 * j), line, fill="black")
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(pipeline.MINI_DIR))
    ap.add_argument("--out", default=None)
    ap.add_argument("--grid", default=None, help="also save a grid of the first 32 images with prompts")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = pipeline.load_mini(a.model)
    r = evaluator.generation_quality(pipe, n=a.n, steps=a.steps, guidance=a.guidance)
    if a.grid:
        save_grid(r["images"][:32], r["prompts"][:32], a.grid)
    res = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("images", "prompts")}
    res.update(steps=a.steps, guidance=a.guidance, threads=a.threads)
    emit_json(res, Path(a.out) if a.out else None)


if __name__ == "__main__":
    main()
