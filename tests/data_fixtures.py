"""Helpers that write bad and unusual image files, for the data-stage and end-to-end tests.

Everything is built on the fly with Pillow, small and fast; the "huge" images are tiny PNGs whose
header claims a huge size, which is exactly what a decompression bomb looks like.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def png_with_header_size(path: Path, width: int, height: int) -> Path:
    """Write a tiny valid PNG, then rewrite its IHDR so the header claims width × height.

    Args:
        path: where to write.
        width: the claimed width in pixels.
        height: the claimed height in pixels.

    Returns:
        The path written.
    """
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # PNG layout: 8-byte signature, then IHDR: length (4) | b"IHDR" (4) | width, height (4 + 4) | … | CRC (4)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def truncated_jpeg(path: Path, size: tuple[int, int] = (128, 128)) -> Path:
    """Write a JPEG cut off halfway, as an interrupted upload leaves it."""
    buffer = io.BytesIO()
    noise = Image.effect_noise(size, 64).convert("RGB")  # noise so the scan data is long enough to cut
    noise.save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_broken_files(folder: Path) -> dict[str, str]:
    """Write one file of every kind the data stage must skip.

    Args:
        folder: an existing folder (e.g. a copy of an example subject).

    Returns:
        File name → a keyword the rejection reason must contain.
    """
    folder = Path(folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not a picture\n")
    truncated_jpeg(folder / "cut_off.jpg")
    Image.new("RGB", (40, 300), (200, 40, 40)).save(folder / "tiny.png")
    png_with_header_size(folder / "huge.png", 10_000, 6_000)  # 60 MP: over the 50 MP limit
    png_with_header_size(folder / "bomb.png", 30_000, 30_000)  # 900 MP: Pillow's own bomb guard fires
    return {
        "empty.jpg": "empty",
        "notes.png": "not an image",
        "cut_off.jpg": "truncated",
        "tiny.png": "too small",
        "huge.png": "too large",
        "bomb.png": "too large",
    }
