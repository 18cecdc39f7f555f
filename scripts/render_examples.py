"""Render the bundled personalisation examples from the held-out part of the procedural world.

    python scripts/render_examples.py [--out assets/examples] [--seed 0]

Writes ``subjects/<name>/{0..4}.png`` (one held-out subject, one colour, flat style, varied pose and
background) and ``styles/<name>/{0..3}.png`` (one held-out style on varied base subjects, colours and
backgrounds, drawn large), each image with a caption sidecar ``{i}.txt`` that names what is *not* the concept
(the subject's rendering; the things a style image pictures), and each folder with a ``scenes.json`` of the
rendered scenes (ground truth for tests and benchmarks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from zipq_mini import world

SUBJECT_COLOURS = {"heart": "red", "moon": "yellow", "arrow": "blue", "bolt": "orange"}


def render_subject_set(name: str, colour: str, rng: np.random.Generator, n: int = 5) -> list[world.Scene]:
    """Scenes of one subject in one colour, flat style, on backgrounds cycling through all four."""
    bgs = [b for b in world.BACKGROUND_NAMES if b != "white" or colour != "yellow"]  # keep contrast
    return [world.sample_scene(rng, "any", subject=name, style="flat", colour=colour, background=bgs[i % len(bgs)])
            for i in range(n)]


def render_style_set(name: str, rng: np.random.Generator, n: int = 4) -> list[world.Scene]:
    """Scenes of one style on distinct base subjects, colours and backgrounds, drawn large.

    Large shapes show several periods of the texture, which is what a style adapter has to learn from
    so few images (as a person would pick clear examples of a style).
    """
    subjects = rng.choice(world.SUBJECTS, size=n, replace=False)
    colours = rng.choice(world.COLOUR_NAMES, size=n, replace=False)
    backgrounds = [world.BACKGROUND_NAMES[i % len(world.BACKGROUND_NAMES)] for i in range(n)]
    scenes = [world.sample_scene(rng, "any", subject=str(s), style=name, colour=str(c), background=b)
              for s, c, b in zip(subjects, colours, backgrounds)]
    return [_enlarged(scene, rng) for scene in scenes]


def _enlarged(scene: world.Scene, rng: np.random.Generator, low: float = 21.0, high: float = 24.0) -> world.Scene:
    """The scene with its shape scaled into [low, high] px radius, re-centred so that it still fits."""
    scale = float(rng.uniform(low, high))
    margin = scale * 0.95 + 1
    x, y = (float(rng.uniform(margin, world.SIZE - margin)) for _ in range(2))
    return dataclasses.replace(scene, scale=scale, x=x, y=y)


def subject_sidecar(scene: world.Scene) -> str:
    """What a subject image shows besides the subject itself: its rendering ("with a flat fill").

    Naming it binds the look to those words instead of to the token, so the subject adapter learns the
    shape, and a style adapter can restyle it later (DreamBooth practice: caption what is not the identity).
    """
    return f"with {world.STYLE_WORDS[scene.style][1]}"


def style_sidecar(scene: world.Scene) -> str:
    """What a style image pictures ("an orange star"), so the style adapter learns the look, not the things."""
    thing = f"{scene.colour} {world.SUBJECT_WORDS[scene.subject][0]}"
    return f"{'an' if thing[0] in 'aeiou' else 'a'} {thing}"


def write_set(folder: Path, scenes: list[world.Scene], sidecar) -> None:
    """Render scenes to ``folder/{i}.png`` with caption sidecars ``{i}.txt``, plus ``scenes.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes):
        world.render(s).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(sidecar(s) + "\n")
    (folder / "scenes.json").write_text(json.dumps([s.to_dict() for s in scenes], indent=1))


def main(out: str = "assets/examples", seed: int = 0) -> None:
    """Render every held-out subject and style set into ``out``."""
    rng = np.random.default_rng(seed)
    for name in world.HELDOUT_SUBJECTS:
        write_set(Path(out) / "subjects" / name, render_subject_set(name, SUBJECT_COLOURS[name], rng),
                  subject_sidecar)
    for name in world.HELDOUT_STYLES:
        write_set(Path(out) / "styles" / name, render_style_set(name, rng), style_sidecar)
    print(f"wrote examples to {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="assets/examples")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.out, a.seed)
