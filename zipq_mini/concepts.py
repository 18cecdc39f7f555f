"""Concepts drawn from continuous families, split into a tuning split and a test split.

The world's named subjects and styles (``zipq_mini.world``) are a dozen fixed shapes and textures; the recipe,
the sliders and the candidate rule were chosen on them. To measure fidelity on concepts that nothing was tuned
on, this module draws new ones from broader families, with continuous parameters:

- ``SubjectConcept``: a radial silhouette r(θ) = 1 + depth · s(cos(lobes · (θ − phase))) with a sharpness
  exponent in s, squeezed by an aspect ratio and a taper (narrower at the top or the bottom), with an optional
  hole and an optional attached part (a knob or a stem);
- ``StyleConcept``: a two-tone texture of one of six kinds (lines, dots, grid, waves, rings, checks) with a
  period, an angle, a line thickness (duty cycle), a contrast and a smooth jitter field.

Splits are drawn by seed: ``tuning`` (seed 1009: 4 subjects, 4 styles) is what defaults may be chosen on;
``test`` (seed 2027: 6 subjects, 6 styles) is only ever scored. A candidate subject is rejected when its
silhouette overlaps a world subject, a tuning subject or an earlier one of its split by IoU > 0.7 at any
rotation within ±25° (the world's pose range); a candidate style when its spectrum is too close to an accepted
one's. ``pairs`` crosses test subject i with styles i and i+1: 12 pairs, each concept in 2.

``example_set`` renders what a user would bring (5 subject images in a flat fill, 3 style images of large
world subjects) and ``write_example_set`` writes them as PNG + caption sidecars, the layout
``zipq_core.data.prepare_images`` reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from . import world

SPLIT_SEEDS: dict[str, int] = {"tuning": 1009, "test": 2027}
SPLIT_SIZES: dict[str, int] = {"tuning": 4, "test": 6}
TEXTURE_KINDS: tuple[str, ...] = ("lines", "dots", "grid", "waves", "rings", "checks")
PART_KINDS: tuple[str, ...] = ("", "knob", "stem")
MAX_IOU = 0.7  # silhouettes overlapping more than this at some pose count as the same subject
MAX_SPECTRUM_COSINE = 0.9  # textures whose power spectra are closer than this count as the same style
SUBJECT_TOKEN, STYLE_TOKEN = "sks", "zkz"
_N = world.SIZE * 4  # the world's supersampled grid side (256)


# ---------------------------------------------------------------------------------------------- subjects
@dataclass(frozen=True)
class SubjectConcept:
    """A silhouette with continuous parameters (unit coordinates, radius ~1, y down)."""

    name: str
    lobes: int  # bumps around the outline (2..7)
    depth: float  # bump amplitude relative to the radius (0.15..0.45)
    sharpness: float  # exponent on the bumps: < 1 boxy, > 1 spiky
    phase: float  # rotation of the bumps, degrees
    aspect: float  # width / height (0.6..1.0)
    taper: float  # width change from top to bottom (-0.35..0.35)
    hole: float  # radius of a hole (0 = none)
    part: str  # "" (none), "knob" (a disc on the rim) or "stem" (a bar out of the rim)
    part_angle: float  # where the part sits, degrees (0 = right, 90 = down)

    def parts(self) -> list[tuple[world.Polygon, bool]]:
        """The silhouette as ``[(polygon, is_hole)]`` for ``world.shape_mask``/``world.render``: fills, then holes."""
        body = [self._point(2 * math.pi * i / 96) for i in range(96)]
        fills = [body] + ([self._part()] if self.part else [])
        scale = 0.95 / max(math.hypot(x, y) for poly in fills for x, y in poly)  # fit the world's unit radius
        out = [([(x * scale, y * scale) for x, y in poly], False) for poly in fills]
        if self.hole > 0:
            out.append(([(x * scale, y * scale) for x, y in _circle(0.0, 0.05, self.hole)], True))
        return out

    def _radius(self, t: float) -> float:
        c = math.cos(self.lobes * (t - math.radians(self.phase)))
        return 1.0 + self.depth * math.copysign(abs(c) ** self.sharpness, c)

    def _point(self, t: float) -> tuple[float, float]:
        r = self._radius(t)
        y = r * math.sin(t)
        return r * math.cos(t) * self.aspect * (1.0 + self.taper * y), y

    def _part(self) -> world.Polygon:
        a = math.radians(self.part_angle)
        x, y = self._point(a)
        if self.part == "knob":  # a disc centred on the rim
            return _circle(x, y, 0.32)
        # stem: a bar of half-width 0.12 from inside the rim to 0.45 beyond it, along the radius
        ux, uy, w = math.cos(a), math.sin(a), 0.12
        near, far = 0.7, math.hypot(x, y) + 0.45
        return [(near * ux - w * uy, near * uy + w * ux), (far * ux - w * uy, far * uy + w * ux),
                (far * ux + w * uy, far * uy - w * ux), (near * ux + w * uy, near * uy - w * ux)]


def _circle(cx: float, cy: float, r: float, n: int = 48) -> world.Polygon:
    return [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)) for i in range(n)]


def random_subject(rng: np.random.Generator, name: str) -> SubjectConcept:
    """A subject with parameters drawn uniformly from the family's ranges."""
    hole = float(rng.uniform(0.18, 0.3)) if rng.random() < 0.3 else 0.0
    return SubjectConcept(name=name, lobes=int(rng.integers(2, 8)), depth=float(rng.uniform(0.15, 0.45)),
                          sharpness=float(rng.uniform(0.4, 2.5)), phase=float(rng.uniform(0, 360)),
                          aspect=float(rng.uniform(0.6, 1.0)), taper=float(rng.uniform(-0.35, 0.35)), hole=hole,
                          part=str(PART_KINDS[int(rng.integers(len(PART_KINDS)))]),
                          part_angle=float(rng.uniform(0, 360)))


# ------------------------------------------------------------------------------------------------ styles
@dataclass(frozen=True)
class StyleConcept:
    """A two-tone texture with continuous parameters (periods in output pixels)."""

    name: str
    kind: str  # one of TEXTURE_KINDS
    period: float  # 6..12 px: the world's VAE keeps periods >= 6 px
    angle: float  # degrees
    thickness: float  # fraction of a period in the main colour (lines) or the dot / line size
    contrast: float  # 1 = the full second tone, lower = the second tone mixed toward the main colour
    jitter: float  # amplitude of a smooth displacement field, in periods
    seed: int  # of the jitter field

    def pattern(self, cx: float = 32.0, cy: float = 32.0) -> np.ndarray:
        """Which pixels take the main colour, (256, 256) float32 in [0, 1] (``world.render``'s ``pattern``).

        Args:
            cx, cy: The shape's centre in output pixels (rings are concentric around it).
        """
        return texture(self, cx, cy)


@lru_cache(maxsize=1)
def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = (np.mgrid[0:_N, 0:_N].astype(np.float32) + 0.5) / 4  # output-pixel coordinates, (256, 256) each
    return xx, yy


def _jitter_field(seed: int) -> np.ndarray:
    """A smooth random field (256, 256) in about [-1, 1]: noise on a 5x5 grid, bicubically upsampled."""
    coarse = np.random.default_rng(seed).uniform(-1, 1, (5, 5)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((_N, _N), Image.Resampling.BICUBIC))


def texture(style: StyleConcept, cx: float = 32.0, cy: float = 32.0) -> np.ndarray:
    """The style's two-tone pattern on the world's supersampled grid, (256, 256) float32, 1 = main colour."""
    xx, yy = _grid()
    a = math.radians(style.angle)
    u = xx * math.cos(a) + yy * math.sin(a)  # across the lines
    v = -xx * math.sin(a) + yy * math.cos(a)  # along the lines
    shift = style.jitter * style.period * _jitter_field(style.seed) if style.jitter else 0.0
    p, t = style.period, style.thickness
    if style.kind == "lines":
        on = ((u + shift) / p) % 1 < t
    elif style.kind == "dots":  # dots of radius t*p/2 on a square lattice
        du, dv = ((u + shift) % p) - p / 2, (v % p) - p / 2
        on = np.hypot(du, dv) < t * p / 2
    elif style.kind == "grid":  # thin tone lines both ways; the cells take the main colour
        on = (((u + shift) % p) >= (1 - t) * p / 2) & ((v % p) >= (1 - t) * p / 2)
    elif style.kind == "waves":
        on = ((u + 0.25 * p * np.sin(2 * math.pi * v / (2 * p)) + shift) / p) % 1 < t
    elif style.kind == "rings":
        on = ((np.hypot(xx - cx, yy - cy) + shift) / p) % 1 < t
    elif style.kind == "checks":
        on = (np.floor((u + shift) / p) + np.floor(v / p)) % 2 == 0
    else:
        raise ValueError(f"unknown texture kind {style.kind!r}; known: {TEXTURE_KINDS}")
    on = on.astype(np.float32)
    return on + (1.0 - on) * (1.0 - style.contrast)


def random_style(rng: np.random.Generator, name: str, kind: str | None = None) -> StyleConcept:
    """A style with parameters drawn uniformly from the family's ranges (``kind`` fixes the kind)."""
    kind = kind or str(TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))])
    thickness = {"lines": (0.3, 0.65), "dots": (0.45, 0.8), "grid": (0.55, 0.8), "waves": (0.35, 0.65),
                 "rings": (0.3, 0.65), "checks": (0.5, 0.5)}[kind]
    return StyleConcept(name=name, kind=kind, period=float(rng.uniform(6.0, 12.0)), angle=float(rng.uniform(0, 180)),
                        thickness=float(rng.uniform(*thickness)), contrast=float(rng.uniform(0.7, 1.0)),
                        jitter=float(rng.uniform(0.0, 0.3)) if rng.random() < 0.5 else 0.0,
                        seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------- similarity
def _mask(parts: list[tuple[world.Polygon, bool]], angle: float = 0.0) -> np.ndarray:
    return world.shape_mask(world.Scene("concept", "flat", "red", "white", 32, 32, 22, angle), parts)


def silhouette_iou(a: list[tuple[world.Polygon, bool]], b: list[tuple[world.Polygon, bool]]) -> float:
    """The largest IoU of two silhouettes (same centre and radius) over rotations of ``a`` within ±25°."""
    mb = _mask(b)
    best = 0.0
    for angle in range(-25, 26, 5):
        ma = _mask(a, angle)
        best = max(best, float(np.minimum(ma, mb).sum() / max(np.maximum(ma, mb).sum(), 1e-6)))
    return best


def _spectrum(style: StyleConcept) -> np.ndarray:
    """Mean-removed magnitude spectrum of the texture at 64 px, flattened and unit-normalised."""
    return _pattern_spectrum(texture(style))


def _pattern_spectrum(pattern: np.ndarray) -> np.ndarray:
    """``_spectrum`` of a (256, 256) supersampled two-tone pattern."""
    small = pattern.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    mag = np.abs(np.fft.rfft2(small - small.mean())).ravel()
    return mag / max(np.linalg.norm(mag), 1e-6)


def spectrum_cosine(a: StyleConcept, b: StyleConcept) -> float:
    """How alike two textures' magnitude spectra are (1 = same frequencies and orientations)."""
    return float(_spectrum(a) @ _spectrum(b))


# ------------------------------------------------------------------------------------------------ splits
@dataclass(frozen=True)
class Split:
    """The concepts of one split."""

    name: str
    subjects: tuple[SubjectConcept, ...]
    styles: tuple[StyleConcept, ...]


def _draw_subjects(rng: np.random.Generator, n: int, prefix: str,
                   avoid: list[list[tuple[world.Polygon, bool]]]) -> list[SubjectConcept]:
    out: list[SubjectConcept] = []
    while len(out) < n:
        cand = random_subject(rng, f"{prefix}_subject_{len(out)}")
        parts = cand.parts()
        if all(silhouette_iou(parts, other) <= MAX_IOU for other in avoid + [c.parts() for c in out]):
            out.append(cand)
    return out


def _draw_styles(rng: np.random.Generator, n: int, prefix: str, avoid: list[StyleConcept]) -> list[StyleConcept]:
    # Kinds in a shuffled cycle, so a split covers as many kinds as it has room for.
    kinds = [str(k) for k in rng.permutation(TEXTURE_KINDS)]
    out: list[StyleConcept] = []
    while len(out) < n:
        cand = random_style(rng, f"{prefix}_style_{len(out)}", kinds[len(out) % len(kinds)])
        if all(spectrum_cosine(cand, other) <= MAX_SPECTRUM_COSINE for other in avoid + out):
            out.append(cand)
    return out


@lru_cache(maxsize=4)
def split(name: str) -> Split:
    """The concepts of split ``name`` ("tuning" or "test"), deterministic.

    The test split avoids the tuning split's concepts (and both avoid the world's subjects), so that no test
    concept is a near copy of one that defaults were chosen on.
    """
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; choose one of {list(SPLIT_SEEDS)}")
    rng = np.random.default_rng(SPLIT_SEEDS[name])
    avoid_subjects = [world.shape_parts(s) for s in world.ALL_SUBJECTS]
    avoid_styles: list[StyleConcept] = []
    if name == "test":
        avoid_subjects += [c.parts() for c in split("tuning").subjects]
        avoid_styles += list(split("tuning").styles)
    n = SPLIT_SIZES[name]
    return Split(name, tuple(_draw_subjects(rng, n, name, avoid_subjects)),
                 tuple(_draw_styles(rng, n, name, avoid_styles)))


def pairs(split_name: str = "test", per_concept: int = 2) -> list[tuple[SubjectConcept, StyleConcept]]:
    """Subject i with styles i, i+1, …, i+per_concept-1 (cyclically): n·per_concept pairs, each concept in
    `per_concept` of them. In blocks of 2n (styles i and i+1, then i+2 and i+3, …), so that the first 2n pairs,
    their order and their indices are the same for every `per_concept`, and a benchmark run in order covers every
    concept evenly."""
    s = split(split_name)
    n = len(s.subjects)
    if not 1 <= per_concept <= n:
        raise ValueError(f"per_concept must be 1..{n} (the split's {n} styles), not {per_concept}")
    return [(s.subjects[i], s.styles[(i + k) % n]) for block in range(0, per_concept, 2) for i in range(n)
            for k in range(block, min(block + 2, per_concept))]


def concept(name: str) -> SubjectConcept | StyleConcept:
    """A concept of either split by name (e.g. "test_subject_3")."""
    for split_name in SPLIT_SEEDS:
        s = split(split_name)
        for c in s.subjects + s.styles:
            if c.name == name:
                return c
    raise ValueError(f"no concept named {name!r}; names look like 'test_subject_0' or 'tuning_style_2'")


# --------------------------------------------------------------------------------------------- rendering
def render_concepts(scene: world.Scene, subject: SubjectConcept | None = None,
                    style: StyleConcept | None = None) -> Image.Image:
    """Render a world scene with a concept as its subject and/or style (None keeps the scene's own).

    Returns:
        A 64x64 RGB image, like ``world.render``.
    """
    parts = subject.parts() if subject is not None else None
    pattern = style.pattern(scene.x, scene.y) if style is not None else None
    return world.render(scene, pattern=pattern, parts=parts)


def _pose(rng: np.random.Generator, low: float = 15.0, high: float = 24.0) -> dict:
    scale = float(rng.uniform(low, high))
    margin = scale * 0.95 + 1
    return {"x": float(rng.uniform(margin, world.SIZE - margin)), "y": float(rng.uniform(margin, world.SIZE - margin)),
            "scale": scale, "angle": float(rng.uniform(-25, 25))}


def random_scene(rng: np.random.Generator, subject: str = "concept", style: str = "concept",
                 colour: str | None = None, background: str | None = None, large: bool = False) -> world.Scene:
    """A scene with random colour, background and pose (``large``: radius 21–24 px, as style examples are drawn)."""
    colour = colour or str(rng.choice(world.COLOUR_NAMES))
    background = background or str(rng.choice(world.BACKGROUND_NAMES))
    pose = _pose(rng, 21.0, 24.0) if large else _pose(rng)
    return world.Scene(subject, style, colour, background, **pose)


@dataclass(frozen=True)
class Example:
    """One example image with its caption and the scene it was rendered from."""

    image: Image.Image
    caption: str
    scene: world.Scene


def _name_seed(name: str) -> int:
    """A stable seed per concept name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode())


def _background_for(colour: str, i: int) -> str:
    bgs = [b for b in world.BACKGROUND_NAMES if b != "white" or colour != "yellow"]  # keep contrast
    return bgs[i % len(bgs)]


def example_set(c: SubjectConcept | StyleConcept, seed: int = 0) -> list[Example]:
    """What a user would bring to personalise ``c``: 5 subject images or 3 style images, with captions.

    Subject: the silhouette in one colour, flat fill, on backgrounds in turn, at random poses; captions name
    what is not the identity ("a photo of a red sks shape with a flat fill on a gray background"). Style: the
    texture on three distinct large world subjects, colours and backgrounds ("a green triangle on a black
    background in zkz style"), so the adapter learns the look rather than the things.
    """
    rng = np.random.default_rng([seed, _name_seed(c.name)])
    out = []
    if isinstance(c, SubjectConcept):
        colour = str(rng.choice(world.COLOUR_NAMES))
        for i in range(5):
            scene = random_scene(rng, colour=colour, background=_background_for(colour, i + int(rng.integers(4))))
            scene = dataclasses.replace(scene, style="flat")
            text = (f"a photo of a {colour} {SUBJECT_TOKEN} shape with a flat fill on a {scene.background} "
                    "background")
            out.append(Example(render_concepts(scene, subject=c), text, scene))
        return out
    subjects = rng.choice(world.SUBJECTS, size=3, replace=False)
    colours = rng.choice(world.COLOUR_NAMES, size=3, replace=False)
    backgrounds = rng.choice(world.BACKGROUND_NAMES, size=3, replace=False)
    for subj, colour, bg in zip(subjects, colours, backgrounds):
        scene = random_scene(rng, subject=str(subj), colour=str(colour), background=str(bg), large=True)
        noun = world.SUBJECT_WORDS[str(subj)][0]
        text = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {noun} on a {bg} background in {STYLE_TOKEN} style"
        out.append(Example(render_concepts(scene, style=c), text, scene))
    return out


def write_example_set(c: SubjectConcept | StyleConcept, folder: str | Path, seed: int = 0) -> Path:
    """Write ``example_set(c, seed)`` as ``{i}.png`` + caption sidecars ``{i}.txt`` and ``concept.json``.

    Returns:
        The folder (the layout ``zipq_core.data.prepare_images`` reads).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    examples = example_set(c, seed)
    for i, ex in enumerate(examples):
        ex.image.save(out / f"{i}.png")
        (out / f"{i}.txt").write_text(ex.caption + "\n")
    (out / "concept.json").write_text(json.dumps({"concept": dataclasses.asdict(c),
                                                  "scenes": [ex.scene.to_dict() for ex in examples]}, indent=1))
    return out


def reference_images(c: SubjectConcept | StyleConcept, n: int = 16, seed: int = 0) -> list[Image.Image]:
    """Clean renders of a concept in varied scenes (what fidelity is measured against).

    A subject is drawn in a random world base style other than outline (so its identity is the silhouette, not
    the fill), a style on random large world base subjects.
    """
    rng = np.random.default_rng([seed, 7, _name_seed(c.name)])
    fills = [s for s in world.STYLES if s != "outline"]
    out = []
    for _ in range(n):
        if isinstance(c, SubjectConcept):
            scene = random_scene(rng, style=str(rng.choice(fills)))
            out.append(render_concepts(scene, subject=c))
        else:
            scene = random_scene(rng, subject=str(rng.choice(world.SUBJECTS)), large=True)
            out.append(render_concepts(scene, style=c))
    return out


# -------------------------------------------------------------------------------- the base model's family
# Words for the family in training captions. None of them is a word the world uses for a style or subject, so
# the world's held-out concepts stay unnamed; "shape" is the noun users' subject prompts use ("a sks shape").
KIND_WORDS: dict[str, str] = {"lines": "ruled", "dots": "speckled", "grid": "lattice", "waves": "wavy",
                              "rings": "ringed", "checks": "tiled"}
_LOBE_WORDS = {2: "two-lobed", 3: "three-lobed", 4: "four-lobed", 5: "five-lobed", 6: "six-lobed",
               7: "seven-lobed"}
TRAINING_SEED = 4099  # the pool the base model trains on; never a split's seed
POOL_SIZES = (600, 300)  # subjects, styles


def subject_words(c: SubjectConcept) -> str:
    """What a caption says about a family subject: "a spiky five-lobed shape with a hole", without the article."""
    feel = "spiky " if c.sharpness > 1.6 else "boxy " if c.sharpness < 0.7 else ""
    extra = (" with a hole" if c.hole else "") + {"": "", "knob": " with a knob", "stem": " with a stem"}[c.part]
    return f"{feel}{_LOBE_WORDS[c.lobes]} shape{extra}"


def style_words(c: StyleConcept) -> str:
    """What a caption says about a family texture: "a fine ruled texture"."""
    grain = "fine" if c.period < 8 else "coarse" if c.period > 10 else "medium"
    return f"a {grain} {KIND_WORDS[c.kind]} texture"


def _world_spectrum(style: str) -> np.ndarray:
    """``_spectrum`` of a world style's pattern over the whole image (centred on the image)."""
    scene = world.Scene("circle", style, "red", "white", 32, 32, 22, 0)
    return _pattern_spectrum(world._pattern(style, np.ones((_N, _N), np.float32), scene))


def _masks_64(parts: list[tuple[world.Polygon, bool]], angles) -> np.ndarray:
    """Silhouette masks at 64 px for each rotation, (len(angles), 4096) bool: a cheap IoU for big pools."""
    return np.stack([_mask(parts, a).reshape(64, 4, 64, 4).mean(axis=(1, 3)).ravel() > 0.5 for a in angles])


@lru_cache(maxsize=2)
def training_pool(seed: int = TRAINING_SEED, sizes: tuple[int, int] = POOL_SIZES
                  ) -> tuple[tuple[SubjectConcept, ...], tuple[StyleConcept, ...]]:
    """The family concepts the base model may train on: none is a near copy of a split's or a held-out one.

    Subjects are rejected like the splits' (IoU > ``MAX_IOU`` at some rotation within ±25°, here at 64 px)
    against the tuning and test subjects and the world's held-out subjects; styles (spectrum cosine >
    ``MAX_SPECTRUM_COSINE``) against the tuning and test styles and the world's held-out styles. So what
    personalisation is scored on stays unseen, as a user's own subject is unseen by a real base model.
    """
    if seed in SPLIT_SEEDS.values():
        raise ValueError(f"seed {seed} is a split's seed; the training pool must be drawn apart from the splits")
    rng = np.random.default_rng(seed)
    angles = range(-25, 26, 5)
    avoid = [world.shape_parts(s) for s in world.HELDOUT_SUBJECTS]
    avoid += [c.parts() for name in SPLIT_SEEDS for c in split(name).subjects]
    avoid_masks = np.concatenate([_masks_64(p, angles) for p in avoid])  # (n * 11, 4096)
    subjects: list[SubjectConcept] = []
    while len(subjects) < sizes[0]:
        cand = random_subject(rng, f"train_subject_{len(subjects)}")
        m = _masks_64(cand.parts(), [0])  # (1, 4096)
        iou = (m & avoid_masks).sum(1) / np.maximum((m | avoid_masks).sum(1), 1)
        if iou.max() <= MAX_IOU:
            subjects.append(cand)
    avoid_spectra = np.stack([_world_spectrum(s) for s in world.HELDOUT_STYLES]
                             + [_spectrum(c) for name in SPLIT_SEEDS for c in split(name).styles])
    styles: list[StyleConcept] = []
    while len(styles) < sizes[1]:
        cand = random_style(rng, f"train_style_{len(styles)}")
        if (avoid_spectra @ _spectrum(cand)).max() <= MAX_SPECTRUM_COSINE:
            styles.append(cand)
    return tuple(subjects), tuple(styles)


def draw_family_scene(rng: np.random.Generator, pool=None
                      ) -> tuple[world.Scene, SubjectConcept | None, StyleConcept | None, str]:
    """One training image of the family, to render with ``render_concepts(scene, subject, style)``, and its caption.

    A third each: a family subject in a world base style, a world base subject in a family texture, both from
    the family (None: the scene's own). Colours, backgrounds and poses as in the world.
    """
    subjects, styles = pool or training_pool()
    kind = int(rng.integers(3))
    subj = subjects[int(rng.integers(len(subjects)))] if kind != 1 else None
    sty = styles[int(rng.integers(len(styles)))] if kind != 0 else None
    scene = world.sample_scene(rng)
    noun = subject_words(subj) if subj else world.SUBJECT_WORDS[scene.subject][0]
    look = style_words(sty) if sty else world.STYLE_WORDS[scene.style][1]
    article = "an" if scene.colour[0] in "aeiou" else "a"
    templates = [f"{article} {scene.colour} {noun} with {look} on a {scene.background} background",
                 f"{article} {scene.colour} {noun} with {look}",
                 f"{article} {scene.colour} {noun} on a {scene.background} background, {look}"]
    text = templates[int(rng.integers(len(templates)))]
    return scene, subj, sty, text


def render_family_dataset(n: int, seed: int, workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """``n`` training images of the family, (n, 64, 64, 3) uint8, and their captions (same seed, same data, for
    any number of rendering ``workers``: the scenes are drawn in this process)."""
    rng = np.random.default_rng([seed, 17])
    pool = training_pool()
    drawn = [draw_family_scene(rng, pool) for _ in range(n)]
    return world.render_all(render_concepts, [d[:3] for d in drawn], workers), [d[3] for d in drawn]
