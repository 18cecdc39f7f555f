"""Render the bundled personalisation examples from the held-out part of the procedural world.

    python scripts/render_examples.py [--out assets/examples] [--seed 0]

Writes ``subjects/<name>/{0..4}.png`` (one held-out subject, one colour, flat style, varied pose and
background) and ``styles/<name>/{0..2}.png`` (one held-out style on varied base subjects and colours), each
folder with a ``scenes.json`` of the rendered scenes (ground truth for tests and benchmarks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from zipq_core import world

SUBJECT_COLOURS = {"heart": "red", "moon": "yellow", "arrow": "blue", "bolt": "orange"}


def render_subject_set(name: str, colour: str, rng: np.random.Generator, n: int = 5) -> list[world.Scene]:
    """Scenes of one subject in one colour, flat style, on backgrounds cycling through all four."""
    bgs = [b for b in world.BACKGROUND_NAMES if b != "white" or colour != "yellow"]  # keep contrast
    return [world.sample_scene(rng, "any", subject=name, style="flat", colour=colour, background=bgs[i % len(bgs)])
            for i in range(n)]


def render_style_set(name: str, rng: np.random.Generator, n: int = 3) -> list[world.Scene]:
    """Scenes of one style on distinct base subjects and colours."""
    subjects = rng.choice(world.SUBJECTS, size=n, replace=False)
    colours = rng.choice(world.COLOUR_NAMES, size=n, replace=False)
    return [world.sample_scene(rng, "any", subject=str(s), style=name, colour=str(c))
            for s, c in zip(subjects, colours)]


def write_set(folder: Path, scenes: list[world.Scene]) -> None:
    """Render scenes to ``folder/{i}.png`` plus ``scenes.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes):
        world.render(s).save(folder / f"{i}.png")
    (folder / "scenes.json").write_text(json.dumps([s.to_dict() for s in scenes], indent=1))


def main(out: str = "assets/examples", seed: int = 0) -> None:
    """Render every held-out subject and style set into ``out``."""
    rng = np.random.default_rng(seed)
    for name in world.HELDOUT_SUBJECTS:
        write_set(Path(out) / "subjects" / name, render_subject_set(name, SUBJECT_COLOURS[name], rng))
    for name in world.HELDOUT_STYLES:
        write_set(Path(out) / "styles" / name, render_style_set(name, rng))
    print(f"wrote examples to {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="assets/examples")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.out, a.seed)
