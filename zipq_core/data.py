"""Data stage: a person's uploads → square RGB training views with captions.

The flow for one file is: header checks (size limits, before any pixel is decoded) → decode the
first frame → EXIF orientation → RGB (alpha on white, 16-bit/float/CMYK/palette converted) → centre
square crop → resize to the training resolution. A file that fails any step becomes a `Rejected`
with a reason in plain words and the run goes on; only too few (or too many) usable images stop it.

Everything here is pure: no printing, no global Pillow settings changed.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DataConfig
from .errors import ZipqError

CAPTION_SUFFIX = ".txt"
# The text encoders read 77 tokens; a longer caption is a mistake (or an attack on the page that shows it).
MAX_CAPTION_CHARS = 1000
MAX_CAPTION_BYTES = 4 * MAX_CAPTION_CHARS  # UTF-8 needs at most 4 bytes a character

# Files that operating systems drop into folders; never the person's images, so skipped silently.
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})
# Data files that travel with image sets (scene descriptions, notes): never images, so not "rejected".
_METADATA_SUFFIXES = frozenset({".json", ".md", ".yaml", ".yml", ".csv"})

# Formats people upload that Pillow cannot decode: a hint says what to do instead.
_FORMAT_HINTS = {
    ".heic": "HEIC photos are not supported; export it as JPEG or PNG",
    ".heif": "HEIF photos are not supported; export it as JPEG or PNG",
    ".svg": "vector (SVG) images are not supported; export it as PNG",
    ".raw": "camera RAW files are not supported; export it as JPEG or PNG",
    ".cr2": "camera RAW files are not supported; export it as JPEG or PNG",
    ".nef": "camera RAW files are not supported; export it as JPEG or PNG",
    ".dng": "camera RAW files are not supported; export it as JPEG or PNG",
}

# Modes whose pixels carry an alpha channel (premultiplied ones included).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ZipqError(message)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _short(error: BaseException) -> str:
    """An exception as a short phrase for a person: its message, or its type when it has none."""
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "…"


@dataclass(frozen=True)
class Rejected:
    """One file that was skipped, and why."""

    name: str  # the file's base name as the person knows it (not a Gradio temp path)
    reason: str  # plain words, e.g. "too small: 40×300 px, each side must be ≥ 64 px"


@dataclass
class TrainingImage:
    """One usable image: RGB, resolution × resolution (or its aspect bucket's size), with its caption, and where
    it came from in SDXL's micro-conditioning terms: the original's (height, width) and the crop's (top, left) in
    the original scaled to cover the view."""

    name: str
    image: Image.Image
    caption: str
    original_size: tuple[int, int] = (0, 0)  # (0, 0): unknown, taken as the view's own size
    crop_top_left: tuple[int, int] = (0, 0)

    def micro_conditioning(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's add_time_ids: original (h, w), crop (top, left), target (h, w)."""
        target = (self.image.height, self.image.width)
        return (*(self.original_size if self.original_size != (0, 0) else target), *self.crop_top_left, *target)


@dataclass
class ImageSet:
    """The usable images in input order and the files that were skipped."""

    images: list[TrainingImage]
    rejected: list[Rejected]

    def summary(self) -> str:
        """Describe the set for a person: counts first, then one line per skipped file.

        Returns:
            e.g. "4 images ready at 64×64 px, 1 file skipped:\\n- notes.pdf: not an image file (cannot be decoded)".
        """
        sizes = sorted({t.image.size for t in self.images})
        size = f" at {sizes[0][0]}×{sizes[0][1]} px" if len(sizes) == 1 else \
            f" in {len(sizes)} aspect-ratio sizes" if sizes else ""
        head = f"{_plural(len(self.images), 'image')} ready{size}"
        if not self.rejected:
            return head + "."
        lines = [f"{head}, {_plural(len(self.rejected), 'file')} skipped:"]
        return "\n".join(lines + [f"- {r.name}: {r.reason}" for r in self.rejected])


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def prepare_images(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    caption: str,
    config: DataConfig = DataConfig(),
    token: str | None = None,
) -> ImageSet:
    """Turn a folder or a list of uploaded files into square training images with captions.

    Args:
        sources: a folder (its files, not sub-folders, sorted by name; hidden files ignored) or a list of
            file paths such as Gradio uploads. `.txt` files are captions, never images.
        caption: the caption every image gets unless a sidecar `<stem>.txt` beside it says otherwise.
        config: resolution and the limits images are checked against.
        token: the concept's token (e.g. "sks"). A sidecar caption that does not mention it is appended to
            the default caption, so every image still teaches the token.

    Returns:
        The usable images (input order) and the skipped files with their reasons.

    Raises:
        ZipqError: the folder or a file does not exist, the caption is empty, fewer than
            `config.min_images` or more than `config.max_images` usable images.
    """
    _check(bool(caption and caption.strip()), "The default caption is empty: give a caption such as 'a photo of "
                                              "sks dog'.")
    images, captions, where = _collect(sources)
    image_set = ImageSet(images=[], rejected=[])
    for path in images:
        result = _prepare_one(path, captions, caption.strip(), config, token or None)
        if isinstance(result, Rejected):
            image_set.rejected.append(result)
            continue
        image_set.images.append(result)
        # Stop early: decoding hundreds more images only to refuse them wastes time and memory.
        _check(len(image_set.images) <= config.max_images,
               f"More than {config.max_images} usable images in {where}: use at most {config.max_images} "
               f"(remove some, or raise max_images).")
    _check_enough(image_set, config.min_images, where)
    return image_set


def _check_enough(image_set: ImageSet, min_images: int, where: str) -> None:
    """Raise a `ZipqError` that names every skipped file when fewer than `min_images` are usable."""
    missing = min_images - len(image_set.images)
    if missing <= 0:
        return
    found = "No" if not image_set.images else f"Only {len(image_set.images)}"
    message = (f"{found} usable image{'' if len(image_set.images) == 1 else 's'} in {where}; at least "
               f"{min_images} {'is' if min_images == 1 else 'are'} needed: "
               f"add {missing} more usable image{'' if missing == 1 else 's'}.")
    if image_set.rejected:
        message += "\nSkipped files:\n" + "\n".join(f"- {r.name}: {r.reason}" for r in image_set.rejected)
    raise ZipqError(message)


# ---------------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------------


def _collect(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], dict[str, Path], str]:
    """Split the sources into candidate images and caption files.

    Args:
        sources: a folder, one file, or a list of files.

    Returns:
        (candidate image paths in order, caption files by lower-cased stem, a description for messages).
    """
    if isinstance(sources, (str, os.PathLike)):
        path = Path(sources)
        _check(path.exists(), f"Image folder not found: {path}. Check the path, or upload the images instead.")
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if _is_candidate(p) and not p.is_dir()), key=lambda p: p.name)
            return _split_captions(files) + (f"folder {path}",)
        return _split_captions([path]) + (f"file {path.name}",)
    paths = [Path(p) for p in sources]
    missing = [str(p) for p in paths if not p.exists()]
    _check(not missing, f"File{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}. "
                        "Upload them again or check the paths.")
    return _split_captions(paths) + (f"the {_plural(len(paths), 'uploaded file')}",)


def _is_candidate(path: Path) -> bool:
    """Hidden files (`.DS_Store`, macOS `._photo.jpg`) and OS clutter are never a person's images."""
    return (not path.name.startswith(".") and path.name.lower() not in _SYSTEM_FILES
            and path.suffix.lower() not in _METADATA_SUFFIXES)


def _split_captions(paths: list[Path]) -> tuple[list[Path], dict[str, Path]]:
    """Separate `.txt` caption files from candidate images (the order of images is kept)."""
    captions = {p.stem.lower(): p for p in paths if p.suffix.lower() == CAPTION_SUFFIX and not p.is_dir()}
    return [p for p in paths if p.suffix.lower() != CAPTION_SUFFIX], captions


# ---------------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------------


def _prepare_one(path: Path, captions: dict[str, Path], default: str, config: DataConfig,
                 token: str | None) -> TrainingImage | Rejected:
    """Load, check, convert and crop one file, or say why it cannot be used."""
    if path.is_dir():
        return Rejected(path.name, "a folder, not an image file: upload the images inside it")
    image = load_image(path, config)
    if isinstance(image, Rejected):
        return image
    text = _caption_for(path, captions, default, token)
    if isinstance(text, Rejected):
        return text
    size = nearest_bucket(*image.size, config.resolution) if config.buckets else (config.resolution,) * 2
    view, crop = fit_view(image, *size)
    return TrainingImage(path.name, view, text, (image.height, image.width), crop)


def load_image(path: Path, config: DataConfig = DataConfig()) -> Image.Image | Rejected:
    """Decode the first frame of an image file as upright RGB, checking size limits first.

    Args:
        path: the file.
        config: `min_side` and `max_megapixels` are checked from the header, before decoding.

    Returns:
        An RGB image at the file's own size (EXIF orientation applied), or a `Rejected` saying why not.
    """
    name = path.name
    try:
        if path.stat().st_size == 0:
            return Rejected(name, "empty file (0 bytes)")
        # Pillow warns (DecompressionBombWarning, corrupt EXIF, palette transparency) on stderr; our own
        # header check below is the guard, and a pure stage prints nothing. (catch_warnings is process-wide
        # in Python < 3.14: at worst another thread's warning is hidden for the few ms of one decode.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                problem = check_header(image.size, config)
                if problem:
                    return Rejected(name, problem)
                decoded = _decode(image, config.resolution)
                return Rejected(name, decoded) if isinstance(decoded, str) else decoded
    except Image.DecompressionBombError:
        return Rejected(name, f"too large: over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (refused as a "
                              f"possible decompression bomb); the limit is {config.max_megapixels:g} megapixels")
    except UnidentifiedImageError:
        return Rejected(name, _FORMAT_HINTS.get(path.suffix.lower(), "not an image file (cannot be decoded)"))
    except PermissionError:
        return Rejected(name, "cannot read the file (permission denied)")
    except FileNotFoundError:
        return Rejected(name, "the file disappeared before it could be read")
    except Exception as error:  # noqa: BLE001
        # Decoders fed untrusted bytes raise OSError, SyntaxError, ValueError, EOFError, struct.error …;
        # whichever it is, this one file is unusable and the run must go on.
        return Rejected(name, f"truncated or corrupt image file ({_short(error)})")


def check_header(size: tuple[int, int], config: DataConfig) -> str | None:
    """Check an image's size as read from its header, before any pixel is decoded.

    Args:
        size: (width, height) in pixels.
        config: the `min_side` and `max_megapixels` limits.

    Returns:
        The reason the size is refused, or None when it is fine.
    """
    width, height = size
    if min(width, height) < config.min_side:
        return f"too small: {width}×{height} px, each side must be ≥ {config.min_side} px"
    megapixels = width * height / 1e6
    if megapixels > config.max_megapixels:
        return (f"too large: {width}×{height} px = {megapixels:.1f} megapixels, the limit is "
                f"{config.max_megapixels:g}; downscale it first")
    return None


def _decode(image: Image.Image, resolution: int) -> Image.Image | str:
    """Decode the current (first) frame and make it upright RGB, or say why it shows nothing."""
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for nearly free; keep ≥ 2× the target so LANCZOS still
    # has detail to work with. A no-op for every other format.
    image.draft(None, (2 * resolution, 2 * resolution))
    image.load()  # decodes now, so truncated data fails here and not later in training
    if _fully_transparent(image):
        return "fully transparent: nothing is drawn in it (check the export's alpha channel)"
    return to_rgb(_upright(image))


def _fully_transparent(image: Image.Image) -> bool:
    """An alpha channel that is 0 everywhere (such an image would train on a blank white square)."""
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return False
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.getextrema()[1] == 0


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so a phone photo stored sideways comes out upright."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        # Broken EXIF says nothing trustworthy about orientation; the pixels themselves are fine, so use
        # them as stored (what most viewers show) rather than refuse a good photo.
        return image.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent areas become white.

    Args:
        image: a decoded image of any mode (1, L, P, I;16, I, F, CMYK, LA, RGBA, …).

    Returns:
        An RGB image of the same size.
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _on_white(image.convert("RGBA"))
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float images to 8-bit grayscale ("L").

    Pillow's own convert("L") clips these at 255 instead of scaling, so a 16-bit photo would come out
    almost white.
    """
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 → 255
    elif image.mode == "F" and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0  # float images are usually 0…1
    elif values.min() >= 0.0 and values.max() <= 255.0:
        scaled = values  # already 8-bit values stored wide
    elif image.mode == "I" and values.min() >= 0.0 and values.max() <= 65535.0:
        scaled = values / 257.0  # 16-bit data opened as 32-bit
    else:
        low, high = values.min(), values.max()  # unknown range: stretch what is there
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        # A 16-bit PNG marks one exact value transparent (tRNS); after scaling other values could round
        # onto it, so turn it into an alpha channel while the original values are still at hand.
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image on white: a transparent background should not become black."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Crop and resize
# ---------------------------------------------------------------------------------------------------


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square inside a width × height image.

    Returns:
        (left, top, right, bottom) for `Image.crop`.
    """
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


BUCKET_STEP = 64  # bucket sides are multiples of this (SDXL's and SD's latents stay whole at every UNet level)
MAX_ASPECT = 2.0  # from 1:2 to 2:1


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) training sizes of about resolution² pixels and at most that many, sides multiples of 64,
    from 1:2 to 2:1 (1024 → 704×1408 … 1024×1024 … 1408×704); the square always among them."""
    step = min(BUCKET_STEP, resolution)
    sizes = {(resolution, resolution)}
    for width in range(step, 2 * resolution + 1, step):
        height = (resolution * resolution // width) // step * step
        if height >= step and 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            sizes |= {(width, height), (height, width)}  # portrait and landscape alike
    return sorted(sizes)


def nearest_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio, so 1:2 and 2:1 are equally far from
    1:1); among equals the one with more pixels."""
    import math

    target = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda s: (abs(math.log(s[0] / s[1]) - target), -s[0] * s[1]))


def fit_view(image: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int]]:
    """Scale the image to cover width × height and centre-crop it there (LANCZOS; the crop is taken first so the
    cropped-away edges do not bleed in). Returns the view and the crop's (top, left) in the scaled image, as SDXL's
    micro-conditioning counts it."""
    w, h = image.size
    scale = max(width / w, height / h)
    box_w, box_h = min(w, round(width / scale)), min(h, round(height / scale))  # the crop in the original's pixels
    left, top = (w - box_w) // 2, (h - box_h) // 2
    view = image.crop((left, top, left + box_w, top + box_h)).resize((width, height), Image.Resampling.LANCZOS,
                                                                      reducing_gap=3.0)
    return view, (round(top * scale), round(left * scale))


def square_view(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square and resize to resolution × resolution with LANCZOS.

    Args:
        image: an RGB image of any size.
        resolution: the side of the output in pixels.

    Returns:
        A new RGB image, resolution × resolution.
    """
    # Crop first: resize(box=…) would let LANCZOS's support reach past the box and bleed the cropped-away
    # edges into the border. reducing_gap shrinks large photos by an integer factor first (fast), then
    # LANCZOS does the rest.
    square = image.crop(center_square_box(*image.size))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)


# ---------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------


def _caption_for(path: Path, captions: dict[str, Path], default: str, token: str | None) -> str | Rejected:
    """The caption for one image: its sidecar `<stem>.txt` if there is one, else the default.

    A sidecar is looked up among the listed `.txt` files (folder contents or uploads), then beside the
    image itself.
    """
    sidecar = captions.get(path.stem.lower()) or _beside(path)
    if sidecar is None:
        return default
    try:
        if sidecar.stat().st_size > MAX_CAPTION_BYTES:
            return Rejected(path.name, f"its caption file {sidecar.name} is {sidecar.stat().st_size / 1e3:.0f} kB; "
                                       f"a caption is at most {MAX_CAPTION_CHARS} characters: shorten it")
        text = " ".join(sidecar.read_text(encoding="utf-8-sig").split())  # one line, single spaces
    except UnicodeDecodeError:
        return Rejected(path.name, f"its caption file {sidecar.name} is not UTF-8 text: save it as UTF-8 or "
                                   "delete it")
    except OSError as error:
        return Rejected(path.name, f"its caption file {sidecar.name} cannot be read ({_short(error)})")
    if len(text) > MAX_CAPTION_CHARS:
        return Rejected(path.name, f"its caption file {sidecar.name} has {len(text)} characters; a caption is at "
                                   f"most {MAX_CAPTION_CHARS} (the text encoder reads about 75 words): shorten it")
    return merge_caption(default, text, token)


def _beside(path: Path) -> Path | None:
    """`<stem>.txt` in the image's own folder, if it exists."""
    sidecar = path.with_suffix(CAPTION_SUFFIX)
    return sidecar if sidecar.is_file() else None


def merge_caption(default: str, sidecar: str, token: str | None = None) -> str:
    """Combine the default caption with a sidecar's text.

    Args:
        default: e.g. "a photo of sks dog".
        sidecar: the sidecar's text, already on one line.
        token: when given and missing from the sidecar text (as a whole word), the default caption is
            prepended so the image still teaches the token.

    Returns:
        The sidecar text, `f"{default}, {sidecar}"`, or the default when the sidecar is empty.
    """
    if not sidecar:
        return default
    if token and not re.search(rf"(?<!\w){re.escape(token)}(?!\w)", sidecar):
        return f"{default}, {sidecar}"
    return sidecar
