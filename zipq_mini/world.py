"""The procedural world that the bundled ``mini`` model is trained on and that the offline evaluator scores.

A scene is one shape (the *subject*) filled with a texture (the *style*) in one *colour*, on a plain
*background*, at a random position, scale and rotation. Scenes render deterministically to 64x64 RGB
(drawn 4x larger and box-filtered down, so edges are anti-aliased) and come with plain-word captions in
varied phrasings. Some subjects and styles are *held out*: the base model never sees them; they are what
users personalise with (``assets/examples`` is rendered from them).

Design notes:
- Subjects differ by silhouette (a diamond is a tall rhombus, never a rotated square: rotations are kept
  within +-25 degrees). Textures live in image coordinates (stripes stay horizontal, hatching diagonal)
  with periods of >= 8 px, which survive a 4x-downsampling VAE.
- The texture's second tone is the colour mixed toward white on dark backgrounds and toward black on
  light ones, so a shape's silhouette stays visible on every background.
- Colour words and background words are disjoint, so ``parse_prompt`` is unambiguous.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64  # output side in pixels
_SS = 4  # supersampling factor used while drawing

SUBJECTS: list[str] = ["circle", "square", "triangle", "star", "cross", "diamond", "house", "hourglass"]
HELDOUT_SUBJECTS: list[str] = ["heart", "moon", "arrow", "bolt"]
STYLES: list[str] = ["flat", "stripes", "dots", "checker", "outline", "gradient"]
HELDOUT_STYLES: list[str] = ["hatching", "zigzag", "grid", "bullseye"]
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (238, 210, 25),
    "green": (35, 155, 55),
    "blue": (35, 80, 215),
    "purple": (125, 50, 180),
    "pink": (240, 115, 180),
    "brown": (115, 65, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 246),
    "gray": (140, 140, 140),
    "black": (22, 22, 22),
    "cream": (238, 226, 190),
}
ALL_SUBJECTS: list[str] = SUBJECTS + HELDOUT_SUBJECTS
ALL_STYLES: list[str] = STYLES + HELDOUT_STYLES
COLOUR_NAMES: list[str] = list(COLOURS)
BACKGROUND_NAMES: list[str] = list(BACKGROUNDS)

# Words used in captions, and every word form parse_prompt accepts (first entry = the caption noun).
SUBJECT_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "disk"],
    "square": ["square"],
    "triangle": ["triangle"],
    "star": ["star"],
    "cross": ["cross", "plus sign"],
    "diamond": ["diamond", "rhombus"],
    "house": ["house"],
    "hourglass": ["hourglass"],
    "heart": ["heart"],
    "moon": ["crescent moon", "moon", "crescent"],
    "arrow": ["arrow"],
    "bolt": ["lightning bolt", "bolt", "lightning"],
}
# (adjective, noun phrase used after "with") per style.
STYLE_WORDS: dict[str, tuple[str, str]] = {
    "flat": ("flat", "a flat fill"),
    "stripes": ("striped", "stripes"),
    "dots": ("dotted", "polka dots"),
    "checker": ("checkered", "a checker pattern"),
    "outline": ("outlined", "only an outline"),
    "gradient": ("gradient", "a gradient"),
    "hatching": ("hatched", "diagonal hatching"),
    "zigzag": ("zigzag", "zigzags"),
    "grid": ("grid-patterned", "a grid pattern"),
    "bullseye": ("bullseye", "bullseye rings"),
}
# Extra word forms that name a style in a prompt (matched as whole words, case-insensitive).
_STYLE_SYNONYMS: dict[str, list[str]] = {
    "flat": ["flat", "solid", "plain"],
    "stripes": ["striped", "stripes", "stripe", "stripy"],
    "dots": ["dotted", "dots", "polka dots", "spotted"],
    "checker": ["checkered", "checker", "checkerboard", "chequered"],
    "outline": ["outlined", "outline", "line drawing"],
    "gradient": ["gradient", "fading"],
    "hatching": ["hatched", "hatching", "cross-hatched"],
    "zigzag": ["zigzag", "zigzags", "zig-zag", "chevron"],
    "grid": ["grid-patterned", "grid", "gridded"],
    "bullseye": ["bullseye", "concentric", "target"],
}


@dataclass(frozen=True)
class Scene:
    """One renderable scene. Positions and scale are in output pixels (0..64)."""

    subject: str
    style: str
    colour: str
    background: str
    x: float  # centre x
    y: float  # centre y
    scale: float  # shape radius
    angle: float  # rotation in degrees, counter-clockwise

    def to_dict(self) -> dict:
        """The scene as a JSON-able dict."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------- shapes
Polygon = list[tuple[float, float]]


def _regular(n: int, radius: float, phase: float = -90.0) -> Polygon:
    """Vertices of a regular n-gon (unit coordinates, y down)."""
    return [
        (radius * math.cos(math.radians(phase + 360 * i / n)), radius * math.sin(math.radians(phase + 360 * i / n)))
        for i in range(n)
    ]


def _star(points: int, outer: float, inner: float) -> Polygon:
    """Vertices of a star with ``points`` tips."""
    out = []
    for i in range(2 * points):
        r = outer if i % 2 == 0 else inner
        a = math.radians(-90 + 180 * i / points)
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart() -> Polygon:
    """The classic parametric heart, scaled to about unit radius."""
    pts = []
    for i in range(72):
        t = 2 * math.pi * i / 72
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 16.5, -(y + 2.5) / 15.5))
    return pts


def shape_parts(subject: str) -> list[tuple[Polygon, bool]]:
    """A subject as polygons in unit coordinates (radius ~1, y down).

    Args:
        subject: One of ``ALL_SUBJECTS``.

    Returns:
        ``[(polygon, is_hole), ...]`` drawn in order: filled parts, then holes cut out of them.
    """
    if subject == "circle":
        return [(_regular(64, 0.9), False)]
    if subject == "square":
        return [([(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)], False)]
    if subject == "triangle":
        return [([(x, y + 0.15) for x, y in _regular(3, 1.0)], False)]
    if subject == "star":
        return [(_star(5, 1.0, 0.42), False)]
    if subject == "cross":
        a, b = 0.3, 0.95
        return [([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                  (-b, -a), (-a, -a)], False)]
    if subject == "diamond":
        return [([(0, -1.0), (0.58, 0), (0, 1.0), (-0.58, 0)], False)]
    if subject == "house":
        body = [(-0.85, -0.1), (0, -0.95), (0.85, -0.1), (0.65, -0.1), (0.65, 0.85), (-0.65, 0.85), (-0.65, -0.1)]
        door = [(-0.18, 0.3), (0.18, 0.3), (0.18, 0.85), (-0.18, 0.85)]
        return [(body, False), (door, True)]
    if subject == "hourglass":
        return [([(-0.7, -0.9), (0.7, -0.9), (0.12, 0), (0.7, 0.9), (-0.7, 0.9), (-0.12, 0)], False)]
    if subject == "heart":
        return [(_heart(), False)]
    if subject == "moon":
        hole = [(x + 0.42, y - 0.2) for x, y in _regular(64, 0.72)]
        return [(_regular(64, 0.9), False), (hole, True)]
    if subject == "arrow":
        return [([(-0.95, -0.2), (0.15, -0.2), (0.15, -0.6), (0.95, 0), (0.15, 0.6), (0.15, 0.2), (-0.95, 0.2)],
                 False)]
    if subject == "bolt":
        return [([(0.15, -1.0), (-0.5, 0.12), (-0.05, 0.12), (-0.22, 1.0), (0.52, -0.2), (0.06, -0.2),
                  (0.38, -1.0)], False)]
    raise ValueError(f"unknown subject {subject!r}; known: {ALL_SUBJECTS}")


def _place(poly: Polygon, scene: Scene) -> Polygon:
    """Rotate, scale and translate a unit polygon into supersampled pixel coordinates."""
    a = math.radians(scene.angle)
    c, s = math.cos(a), math.sin(a)
    # y points down, so a counter-clockwise rotation on screen is (x c + y s, -x s + y c).
    return [((scene.x + scene.scale * (x * c + y * s)) * _SS, (scene.y + scene.scale * (-x * s + y * c)) * _SS)
            for x, y in poly]


def shape_mask(scene: Scene, parts: list[tuple[Polygon, bool]] | None = None) -> np.ndarray:
    """The subject's coverage at supersampled resolution, float32 (256, 256) in [0, 1].

    Args:
        scene: Where and how large to draw the subject.
        parts: Unit polygons to draw instead of ``shape_parts(scene.subject)`` (a shape from outside the
            world's lists, e.g. ``zipq_mini.concepts``).
    """
    img = Image.new("L", (SIZE * _SS, SIZE * _SS), 0)
    draw = ImageDraw.Draw(img)
    for poly, hole in shape_parts(scene.subject) if parts is None else parts:
        draw.polygon(_place(poly, scene), fill=0 if hole else 255)
    return np.asarray(img, dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------- styles
def _pattern(style: str, mask: np.ndarray, scene: Scene) -> np.ndarray:
    """Which pixels take the main colour (1) vs the second tone (0), float32 (256, 256).

    Coordinates are in output pixels (supersampled grid / 4) so periods read as at 64 px.
    """
    n = SIZE * _SS
    yy, xx = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / _SS  # (256, 256) each
    if style == "flat":
        return np.ones_like(mask)
    if style == "stripes":  # horizontal bands, period 8
        return ((yy // 4) % 2 == 0).astype(np.float32)
    if style == "dots":  # tone background with colour dots, period 10
        d = np.hypot((xx % 10) - 5, (yy % 10) - 5)
        return (d < 3.4).astype(np.float32)
    if style == "checker":  # 6-px cells
        return (((xx // 6) + (yy // 6)) % 2 == 0).astype(np.float32)
    if style == "gradient":  # full colour at the top of the shape fading to the tone at the bottom
        rows = np.where(mask.max(axis=1) > 0.5)[0]
        top, bot = (rows.min(), rows.max()) if len(rows) else (0, n - 1)
        t = np.clip((np.arange(n, dtype=np.float32) - top) / max(1.0, bot - top), 0, 1)
        return np.repeat((1 - t)[:, None], n, axis=1)
    if style == "hatching":  # thin diagonal lines of the tone, period 7
        return (((xx + yy) % 7) >= 2.2).astype(np.float32)
    if style == "zigzag":  # horizontal zigzag bands, period 8 vertically, 8 horizontally
        tri = np.abs(((xx / 8) % 1) - 0.5) * 2  # 0..1 triangle wave
        return (((yy + 4 * tri) // 4) % 2 == 0).astype(np.float32)
    if style == "grid":  # thin tone lines every 8 px both ways
        return (((xx % 8) >= 1.8) & ((yy % 8) >= 1.8)).astype(np.float32)
    if style == "bullseye":  # concentric rings around the shape's centre, period 8
        return ((np.hypot(xx - scene.x, yy - scene.y) // 4) % 2 == 0).astype(np.float32)
    raise ValueError(f"unknown style {style!r}; known: {ALL_STYLES}")


GENERIC_PATTERNS: tuple[str, ...] = ("grating", "plaid", "rings", "wave")


def generic_pattern(rng: np.random.Generator) -> np.ndarray:
    """A random two-tone texture from a generic family, for training the image codec (the VAE decoder).

    Gratings, plaids, rings and wavy gratings at a random angle, period (6-14 px), duty cycle and centre.
    They are not styles of the world (no words name them; the UNet never trains on them): they teach the
    decoder oriented and curved high-frequency patterns in general, as a real VAE learns them from natural
    images, so that a texture a user brings can be decoded once an adapter has learned to draw it. The
    held-out styles' own renderer is never used for this.

    Returns:
        (256, 256) float32 in [0, 1] on the supersampled grid (1 = main colour), like ``_pattern``.
    """
    n = SIZE * _SS
    yy, xx = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / _SS
    kind = GENERIC_PATTERNS[int(rng.integers(len(GENERIC_PATTERNS)))]
    angle, period, duty = rng.uniform(0, math.pi), rng.uniform(6, 14), rng.uniform(0.25, 0.75)
    u = xx * math.cos(angle) + yy * math.sin(angle)  # coordinate across the lines
    if kind == "grating":
        on = (u / period) % 1 < duty
    elif kind == "plaid":
        other = angle + rng.uniform(math.pi / 4, 3 * math.pi / 4)
        on = ((u / period) % 1 < duty) & (((xx * math.cos(other) + yy * math.sin(other)) / period) % 1 < duty)
    elif kind == "rings":
        cx, cy = rng.uniform(0, SIZE, 2)
        on = (np.hypot(xx - cx, yy - cy) / period) % 1 < duty
    else:  # wave: a grating displaced by a sine along the lines
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        amplitude, wavelength = rng.uniform(1, 4), rng.uniform(6, 16)
        on = ((u + amplitude * np.sin(2 * math.pi * v / wavelength)) / period) % 1 < duty
    return on.astype(np.float32)


def _outline(mask: np.ndarray, width_px: float = 3.0) -> np.ndarray:
    """The band of ``mask`` within ``width_px`` output pixels of its edge."""
    img = Image.fromarray((mask * 255).astype(np.uint8))
    k = int(round(width_px * _SS)) | 1  # odd
    inner = np.asarray(img.filter(ImageFilter.MinFilter(k)), dtype=np.float32) / 255.0
    return np.clip(mask - inner, 0, 1)


def _second_tone(colour: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The texture's other tone: lighter on dark backgrounds, darker on light ones."""
    if background.mean() < 128:
        return colour * 0.45 + 255 * 0.55
    return colour * 0.5


def render(scene: Scene, pattern: np.ndarray | None = None,
           parts: list[tuple[Polygon, bool]] | None = None) -> Image.Image:
    """Draw a scene.

    Args:
        scene: What to draw.
        pattern: Replaces the style's two-tone pattern ((256, 256) in [0, 1], 1 = main colour), e.g. a
            ``generic_pattern`` for codec training; None draws ``scene.style``.
        parts: Replaces the subject's polygons (see ``shape_mask``); None draws ``scene.subject``.

    Returns:
        A 64x64 RGB PIL image (deterministic: same scene, same pixels).
    """
    mask = shape_mask(scene, parts)  # (256, 256)
    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if pattern is None and scene.style == "outline":
        mask = _outline(mask)
        fill = np.broadcast_to(colour, mask.shape + (3,))
    else:
        p = (_pattern(scene.style, mask, scene) if pattern is None else pattern)[..., None]  # (256, 256, 1)
        fill = p * colour + (1 - p) * _second_tone(colour, bg)
    m = mask[..., None]
    img = m * fill + (1 - m) * bg  # (256, 256, 3)
    big = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


# --------------------------------------------------------------------------------------------- sampling
def _pools(held_out: bool | str) -> tuple[list[str], list[str]]:
    if held_out is False:
        return SUBJECTS, STYLES
    if held_out is True or held_out == "any":
        return ALL_SUBJECTS, ALL_STYLES
    raise ValueError(f"held_out must be False, True or 'any', not {held_out!r}")


def sample_scene(
    rng: np.random.Generator,
    held_out: bool | str = False,
    subject: str | None = None,
    style: str | None = None,
    colour: str | None = None,
    background: str | None = None,
) -> Scene:
    """Draw a random scene.

    Args:
        rng: Source of randomness (``np.random.default_rng(seed)``).
        held_out: False: base subjects and styles only (what the base model trains on). True: at least one of
            subject and style is held out. ``'any'``: uniform over all subjects and styles.
        subject, style, colour, background: Fix an attribute instead of sampling it.

    Returns:
        A ``Scene`` that fits inside the image.
    """
    subjects, styles = _pools(held_out)
    while True:
        subj = subject or str(rng.choice(subjects))
        sty = style or str(rng.choice(styles))
        ok = held_out is not True or subj in HELDOUT_SUBJECTS or sty in HELDOUT_STYLES
        if ok or (subject and style):
            break
    scale = float(rng.uniform(15, 24))
    margin = scale * 0.95 + 1
    return Scene(
        subject=subj,
        style=sty,
        colour=colour or str(rng.choice(COLOUR_NAMES)),
        background=background or str(rng.choice(BACKGROUND_NAMES)),
        x=float(rng.uniform(margin, SIZE - margin)),
        y=float(rng.uniform(margin, SIZE - margin)),
        scale=scale,
        angle=float(rng.uniform(-25, 25)),
    )


# --------------------------------------------------------------------------------------------- captions
_TEMPLATES = [
    "a {colour} {subject} with {style_noun} on a {background} background",
    "a {colour} {subject} with {style_noun}",
    "{colour} {style_adj} {subject}, {background} background",
    "a {style_adj} {colour} {subject} on {background}",
    "a {style_adj} {colour} {subject}",
    "{style_adj} {subject} in {colour}, on a {background} background",
    "a picture of a {colour} {subject}, {style_adj}",
    "a {colour} {subject} drawn {style_adv}, {background} background",
]
_STYLE_ADV = {
    "flat": "in flat colour",
    "stripes": "with stripes",
    "dots": "with polka dots",
    "checker": "in a checker pattern",
    "outline": "as an outline",
    "gradient": "with a gradient",
    "hatching": "with hatching",
    "zigzag": "with zigzags",
    "grid": "with a grid pattern",
    "bullseye": "with bullseye rings",
}


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A plain-word caption that names the scene's subject, style and colour (and often its background).

    Args:
        scene: The scene.
        rng: Picks the phrasing; None gives the first (canonical) template.

    Returns:
        The caption, e.g. "a red star with stripes on a blue background".
    """
    template = _TEMPLATES[0] if rng is None else _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    adj, noun = STYLE_WORDS[scene.style]
    return template.format(
        colour=scene.colour,
        subject=SUBJECT_WORDS[scene.subject][0],
        style_adj=adj,
        style_noun=noun,
        style_adv=_STYLE_ADV[scene.style],
        background=scene.background,
    )


def _find(text: str, table: dict[str, list[str]]) -> str | None:
    """The entry of ``table`` whose word form occurs earliest in ``text`` (longest form wins ties)."""
    best: tuple[int, int, str] | None = None
    for name, forms in table.items():
        for form in forms:
            m = re.search(r"(?<![a-z-])" + re.escape(form) + r"(?![a-z-])", text)
            if m and (best is None or (m.start(), -len(form)) < (best[0], best[1])):
                best = (m.start(), -len(form), name)
    return best[2] if best else None


def parse_prompt(text: str) -> dict[str, str | None]:
    """Which subject, style, colour and background words a prompt names.

    Args:
        text: A prompt, e.g. "a red star with stripes on a gray background".

    Returns:
        ``{"subject", "style", "colour", "background"}`` -> canonical name or None when not named. A colour
        named as ``"<colour> background"`` counts as the background, not the shape's colour.
    """
    t = text.lower().replace("grey", "gray").replace("color", "colour")
    bg = re.search(r"(?<![a-z])(\w+) background", t)
    background = None
    if bg and bg.group(1) in BACKGROUNDS:
        background = bg.group(1)
        t = t[: bg.start()] + t[bg.end():]
    else:
        m = re.search(r"\bon (?:a |an )?(\w+)\b", t)
        if m and m.group(1) in BACKGROUNDS:
            background = m.group(1)
            t = t[: m.start()] + t[m.end():]
    return {
        "subject": _find(t, SUBJECT_WORDS),
        "style": _find(t, _STYLE_SYNONYMS),
        "colour": _find(t, {c: [c] for c in COLOURS}),
        "background": background,
    }


# ---------------------------------------------------------------------------------------------- datasets
def render_dataset(n: int, seed: int, held_out: bool | str = False, workers: int = 1
                   ) -> tuple[np.ndarray, list[Scene]]:
    """Render ``n`` random scenes.

    Args:
        n: Number of images.
        seed: Seed of the scene sampler (same seed, same images).
        held_out: As in ``sample_scene``.
        workers: Processes that render (the scenes are drawn in this one: any count gives the same images).

    Returns:
        ``(images, scenes)``: uint8 array (n, 64, 64, 3) and the scenes drawn.
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, held_out) for _ in range(n)]
    return render_all(render, [(s,) for s in scenes], workers), scenes


def render_all(draw, calls: list[tuple], workers: int = 1) -> np.ndarray:
    """``np.stack`` of ``draw(*call)`` for each call, as uint8 arrays, over ``workers`` processes (in order)."""
    if workers <= 1 or len(calls) < 2:
        return np.stack([_as_array(draw, c) for c in calls])
    import multiprocessing

    chunk = max(1, len(calls) // (8 * workers))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return np.stack(pool.starmap(_as_array, [(draw, c) for c in calls], chunksize=chunk))


def _as_array(draw, call: tuple) -> np.ndarray:
    return np.asarray(draw(*call))


def labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Integer class labels per attribute: indices into ALL_SUBJECTS, ALL_STYLES, COLOUR_NAMES, BACKGROUND_NAMES."""
    return {
        "subject": np.array([ALL_SUBJECTS.index(s.subject) for s in scenes], dtype=np.int64),
        "style": np.array([ALL_STYLES.index(s.style) for s in scenes], dtype=np.int64),
        "colour": np.array([COLOUR_NAMES.index(s.colour) for s in scenes], dtype=np.int64),
        "background": np.array([BACKGROUND_NAMES.index(s.background) for s in scenes], dtype=np.int64),
    }
