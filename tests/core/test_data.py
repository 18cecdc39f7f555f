"""Data stage: bad files are named and skipped, odd formats come out as upright RGB training views."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zipq_core.data import (
    DataConfig,
    ImageSet,
    Rejected,
    bucket_sizes,
    center_square_box,
    fit_view,
    merge_caption,
    nearest_bucket,
    prepare_images,
    square_view,
)
from zipq_core.errors import ZipqError

from helpers import png_with_header_size, truncated_jpeg, write_broken_files

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
CAPTION = "a photo of sks dog"


def solid(path: Path, color=RED, size=(96, 80), mode="RGB", **save) -> Path:
    """Write a one-colour image and return its path."""
    Image.new(mode, size, color).save(path, **save)
    return path


def good_images(folder: Path, count: int = 2) -> list[Path]:
    return [solid(folder / f"good{i}.png") for i in range(count)]


def prepare_one(path: Path, config: DataConfig | None = None) -> Image.Image:
    """Prepare a folder holding `path` plus a good image; return the prepared view of `path`."""
    config = config or DataConfig()
    solid(path.parent / "zz_good.png")
    result = prepare_images(path.parent, CAPTION, config)
    assert result.rejected == []
    (view,) = [im for im in result.images if im.name == path.name]
    return view.image


def pixel(image: Image.Image, x: float = 0.5, y: float = 0.5) -> tuple[int, ...]:
    """The pixel at a fractional position."""
    return image.getpixel((int(x * (image.width - 1)), int(y * (image.height - 1))))


def close(actual, expected, tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- Rejections --------------------------------------------------------------------------------------


def test_every_broken_kind_is_named_with_its_reason(tmp_path):
    expected = write_broken_files(tmp_path)
    good_images(tmp_path, 2)

    result = prepare_images(tmp_path, CAPTION)

    assert [im.name for im in result.images] == ["good0.png", "good1.png"]
    reasons = {r.name: r.reason for r in result.rejected}
    assert set(reasons) == set(expected)
    for name, keyword in expected.items():
        assert keyword in reasons[name], (name, reasons[name])


def test_reasons_give_sizes_and_limits(tmp_path):
    write_broken_files(tmp_path)
    good_images(tmp_path, 2)

    reasons = {r.name: r.reason for r in prepare_images(tmp_path, CAPTION).rejected}

    assert reasons["tiny.png"] == "too small: 40×300 px, each side must be ≥ 64 px"
    assert "10000×6000 px = 60.0 megapixels" in reasons["huge.png"] and "limit is 50" in reasons["huge.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert reasons["notes.png"] == "not an image file (cannot be decoded)"


def test_size_limits_follow_the_config(tmp_path):
    solid(tmp_path / "small.png", size=(50, 50))
    solid(tmp_path / "big.png", size=(200, 200))
    good_images(tmp_path, 2)

    result = prepare_images(tmp_path, CAPTION, DataConfig(min_side=48, max_megapixels=0.03))

    assert [r.name for r in result.rejected] == ["big.png"]
    assert "limit is 0.03" in result.rejected[0].reason


def test_oversized_header_is_refused_before_decoding(tmp_path, recwarn):
    # 100 MP sits between Pillow's warning (89 MP) and error (179 MP) thresholds: our own check must
    # refuse it, without the warning leaking out and without Pillow's global limit changing.
    limit = Image.MAX_IMAGE_PIXELS
    png_with_header_size(tmp_path / "warned.png", 10_000, 10_000)
    good_images(tmp_path, 2)

    result = prepare_images(tmp_path, CAPTION)

    assert [r.name for r in result.rejected] == ["warned.png"]
    assert "too large" in result.rejected[0].reason
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit


def test_truncated_png_is_rejected(tmp_path):
    good_images(tmp_path, 2)
    Image.effect_noise((128, 128), 64).save(tmp_path / "noisy.png")
    noisy = (tmp_path / "noisy.png").read_bytes()
    (tmp_path / "noisy.png").unlink()
    (tmp_path / "cut.png").write_bytes(noisy[: len(noisy) // 2])

    result = prepare_images(tmp_path, CAPTION)

    assert [r.name for r in result.rejected] == ["cut.png"]
    assert "truncated" in result.rejected[0].reason


def test_unsupported_format_gets_a_hint(tmp_path):
    (tmp_path / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    good_images(tmp_path, 2)

    (rejected,) = prepare_images(tmp_path, CAPTION).rejected

    assert rejected.name == "phone.heic" and "HEIC" in rejected.reason and "JPEG" in rejected.reason


def test_too_few_images_raises_listing_every_reason(tmp_path):
    expected = write_broken_files(tmp_path)
    good_images(tmp_path, 1)

    with pytest.raises(ZipqError) as caught:
        prepare_images(tmp_path, CAPTION)

    message = str(caught.value)
    assert "Only 1 usable image" in message and "add 1 more usable image" in message
    for name, keyword in expected.items():
        line = next(line for line in message.splitlines() if line.startswith(f"- {name}:"))
        assert keyword in line


def test_no_images_at_all_says_how_many_to_add(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")

    with pytest.raises(ZipqError, match=r"(?s)No usable images .* add 2 more usable images.*\n- empty.jpg: empty"):
        prepare_images(tmp_path, CAPTION)


def test_too_many_images_raises(tmp_path):
    good_images(tmp_path, 4)

    with pytest.raises(ZipqError, match="use at most 3"):
        prepare_images(tmp_path, CAPTION, DataConfig(max_images=3))


def test_missing_folder_and_missing_file_are_named(tmp_path):
    with pytest.raises(ZipqError, match="nowhere"):
        prepare_images(tmp_path / "nowhere", CAPTION)
    (good,) = good_images(tmp_path, 1)
    with pytest.raises(ZipqError, match="gone.png"):
        prepare_images([good, tmp_path / "gone.png"], CAPTION)


# --- Conversions --------------------------------------------------------------------------------------


def red_over_blue(size=(120, 90)) -> Image.Image:
    """An upright picture: top half red, bottom half blue (wider than tall, so rotation shows)."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (0, size[1] // 2, size[0], size[1]))
    return image


@pytest.mark.parametrize(("orientation", "stored_as"), [
    (6, Image.Transpose.ROTATE_90),  # camera held one way: viewers rotate 90° clockwise to show it
    (8, Image.Transpose.ROTATE_270),  # held the other way: viewers rotate 90° anticlockwise
    (3, Image.Transpose.ROTATE_180),
])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, stored_as):
    stored = red_over_blue().transpose(stored_as)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    view = prepare_one(tmp_path / "phone.jpg")

    assert close(pixel(view, 0.5, 0.1), RED), pixel(view, 0.5, 0.1)
    assert close(pixel(view, 0.5, 0.9), BLUE), pixel(view, 0.5, 0.9)


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (96, 96), (0, 0, 0, 0))  # transparent black must become white, not black
    image.paste((255, 0, 0, 128), (48, 0, 96, 96))  # right half: half-transparent red

    image.save(tmp_path / "cutout.png")
    view = prepare_one(tmp_path / "cutout.png")

    assert view.getpixel((5, 32)) == WHITE
    assert close(view.getpixel((60, 32)), (255, 127, 127), 2)


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    image = Image.new("LA", (96, 80), (0, 0))
    image.paste((0, 255), (48, 0, 96, 80))  # right half: opaque black; left half: transparent
    image.save(tmp_path / "la.png")
    view = prepare_one(tmp_path / "la.png")

    assert view.getpixel((10, 32)) == WHITE and view.getpixel((60, 32)) == (0, 0, 0)


@pytest.mark.parametrize("mode, colour", [("LA", (0, 0)), ("RGBA", (255, 0, 0, 0))])
def test_a_fully_transparent_image_is_refused_with_its_reason(tmp_path, mode, colour):
    solid(tmp_path / "ghost.png", color=colour, mode=mode)
    good_images(tmp_path)
    result = prepare_images(tmp_path, CAPTION, DataConfig())

    assert [r.name for r in result.rejected] == ["ghost.png"]
    assert "fully transparent" in result.rejected[0].reason and len(result.images) == 2


def test_an_overlong_caption_is_refused_not_echoed(tmp_path):
    good_images(tmp_path, 3)
    (tmp_path / "good0.txt").write_text("word " * 5000)
    result = prepare_images(tmp_path, CAPTION, DataConfig(), token="sks")

    assert [r.name for r in result.rejected] == ["good0.png"]
    assert "at most 1000" in result.rejected[0].reason and "word word" not in result.rejected[0].reason


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency_on_white(tmp_path, suffix):
    image = Image.new("P", (96, 96), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (3 * 254))
    image.paste(1, (48, 0, 96, 96))  # right half: green; left half: index 0, transparent

    image.save(tmp_path / f"logo{suffix}", transparency=0)
    view = prepare_one(tmp_path / f"logo{suffix}")

    assert view.getpixel((5, 32)) == WHITE
    assert close(view.getpixel((60, 32)), GREEN, 2)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    # A 16-bit ramp; Pillow's plain convert("L") would clip everything above 255 to white.
    values = np.tile(np.linspace(0, 65535, 128), (128, 1)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode.startswith("I")

    view = np.asarray(prepare_one(tmp_path / "scan.png"))

    assert view[32, 0, 0] <= 3 and view[32, 63, 0] >= 252
    assert abs(int(view[32, 32, 0]) - 128) <= 6
    assert (view[..., 0] == view[..., 1]).all() and (view[..., 1] == view[..., 2]).all()


@pytest.mark.parametrize(("mode", "values"), [
    ("F", np.linspace(0.0, 1.0, 96, dtype=np.float32)),  # float 0…1
    ("I", np.linspace(0, 65535, 96).astype(np.int32)),  # 32-bit holding 16-bit data
    ("I", np.linspace(-1000, 100_000, 96).astype(np.int32)),  # unknown range: stretched
])
def test_wide_grayscale_modes_are_scaled(tmp_path, mode, values):
    Image.fromarray(np.tile(values, (96, 1)), mode=mode).save(tmp_path / "wide.tiff")
    assert Image.open(tmp_path / "wide.tiff").mode == mode

    view = np.asarray(prepare_one(tmp_path / "wide.tiff"))

    assert view[32, 0, 0] <= 3 and view[32, 63, 0] >= 252


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    solid(tmp_path / "print.jpg", color=(0, 255, 255, 0), mode="CMYK", quality=95)  # pure red in CMYK

    view = prepare_one(tmp_path / "print.jpg")

    assert close(view.getpixel((32, 32)), RED)


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_grayscale_bilevel_and_palette_become_rgb(tmp_path, mode):
    image = Image.new(mode, (80, 80), 255 if mode != "P" else 0)
    if mode == "P":
        image.putpalette([10, 20, 200] + [0] * 765)

    image.save(tmp_path / "plain.png")
    view = prepare_one(tmp_path / "plain.png")

    assert view.mode == "RGB"
    assert view.getpixel((32, 32)) == (WHITE if mode != "P" else (10, 20, 200))


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png"])
def test_animated_image_uses_its_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (80, 80), color) for color in (RED, BLUE, GREEN)]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert getattr(Image.open(path), "n_frames", 1) == 3

    view = prepare_one(path)

    assert close(view.getpixel((32, 32)), RED, 4)


# --- Crop, size and order -----------------------------------------------------------------------------


def test_output_is_rgb_square_at_resolution(tmp_path):
    solid(tmp_path / "wide.png", size=(300, 100))
    solid(tmp_path / "tall.jpg", size=(70, 500), color=BLUE)

    result = prepare_images(tmp_path, CAPTION, DataConfig(resolution=96))

    assert [(im.image.mode, im.image.size) for im in result.images] == [("RGB", (96, 96))] * 2


def test_centre_square_crop_keeps_the_middle(tmp_path):
    image = Image.new("RGB", (300, 100), BLUE)
    image.paste(RED, (100, 0, 200, 100))  # the middle third is red
    image.paste(GREEN, (200, 0, 300, 100))
    image.save(tmp_path / "strip.png")

    view = np.asarray(prepare_one(tmp_path / "strip.png"))

    # Exactly the middle square: nothing of the blue and green sides bleeds into the border.
    assert (view == RED).all()


def test_center_square_box():
    assert center_square_box(300, 100) == (100, 0, 200, 100)
    assert center_square_box(100, 301) == (0, 100, 100, 200)
    assert center_square_box(64, 64) == (0, 0, 64, 64)


def test_folder_is_sorted_and_skips_hidden_files_dirs_and_sidecars(tmp_path):
    for name in ("b.png", "a.jpg", "c.webp"):
        solid(tmp_path / name)
    (tmp_path / ".DS_Store").write_bytes(b"\x00junk")
    (tmp_path / "._a.jpg").write_bytes(b"\x00junk")
    (tmp_path / "nested").mkdir()
    solid(tmp_path / "nested" / "inner.png")
    (tmp_path / "notes.txt").write_text("not a sidecar of any image")

    result = prepare_images(tmp_path, CAPTION)

    assert [im.name for im in result.images] == ["a.jpg", "b.png", "c.webp"]
    assert result.rejected == []


def test_list_input_uses_base_names(tmp_path):
    # Gradio keeps each upload in its own temporary folder under its original name.
    paths = []
    for i, name in enumerate(["dog1.jpg", "dog2.png", "broken.jpg"]):
        (tmp_path / f"upload{i}").mkdir()
        paths.append(tmp_path / f"upload{i}" / name)
    solid(paths[0])
    solid(paths[1])
    paths[2].write_bytes(b"")

    result = prepare_images([str(p) for p in paths], CAPTION)

    assert [im.name for im in result.images] == ["dog1.jpg", "dog2.png"]
    assert result.rejected == [Rejected("broken.jpg", "empty file (0 bytes)")]


def test_result_is_independent_of_the_files(tmp_path):
    paths = good_images(tmp_path, 2)

    result = prepare_images(paths, CAPTION)
    for path in paths:
        path.unlink()

    assert result.images[0].image.getpixel((0, 0)) == RED


# --- Captions -----------------------------------------------------------------------------------------


def test_default_caption_for_every_image(tmp_path):
    good_images(tmp_path, 2)

    assert [im.caption for im in prepare_images(tmp_path, CAPTION).images] == [CAPTION, CAPTION]


def test_sidecar_overrides_and_keeps_the_token(tmp_path):
    good_images(tmp_path, 3)
    (tmp_path / "good0.txt").write_text("a photo of sks dog on a beach\n")
    (tmp_path / "good1.txt").write_text("on a red\nsofa")  # no token: the default caption is prepended

    captions = [im.caption for im in prepare_images(tmp_path, CAPTION, token="sks").images]

    assert captions == ["a photo of sks dog on a beach", f"{CAPTION}, on a red sofa", CAPTION]


def test_sidecar_without_token_argument_replaces_the_caption(tmp_path):
    good_images(tmp_path, 2)
    (tmp_path / "good0.txt").write_text("a dog on grass")

    assert prepare_images(tmp_path, CAPTION).images[0].caption == "a dog on grass"


def test_sidecar_in_uploaded_list_is_matched_by_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = good_images(tmp_path / "a", 2)
    caption_file = tmp_path / "b" / "good1.txt"  # uploaded separately, lives in another temp folder
    caption_file.write_text("sks dog asleep", encoding="utf-8-sig")

    result = prepare_images([*paths, caption_file], CAPTION, token="sks")

    assert [im.caption for im in result.images] == [CAPTION, "sks dog asleep"]


def test_undecodable_sidecar_rejects_its_image(tmp_path):
    good_images(tmp_path, 3)
    (tmp_path / "good2.txt").write_bytes(b"\xff\xfe\xfa caption")

    result = prepare_images(tmp_path, CAPTION)

    assert [r.name for r in result.rejected] == ["good2.png"]
    assert "good2.txt is not UTF-8" in result.rejected[0].reason


@pytest.mark.parametrize(("sidecar", "expected"), [
    ("sks dog running", "sks dog running"),
    ("asks for food", f"{CAPTION}, asks for food"),  # "sks" inside a word does not count
    ("", CAPTION),
])
def test_merge_caption(sidecar, expected):
    assert merge_caption(CAPTION, sidecar, "sks") == expected


# --- Config, summary, purity --------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"resolution": 100}, "multiple of 8"),
    ({"resolution": 32}, "between 64 and 2048"),
    ({"resolution": 4096}, "between 64 and 2048"),
    ({"min_side": 0}, "min_side"),
    ({"max_megapixels": 0}, "max_megapixels"),
    ({"max_megapixels": 500}, "at most 170"),
    ({"min_images": 0}, "min_images"),
    ({"min_images": 5, "max_images": 4}, "max_images"),
    ({"resolution": True}, "resolution"),
])
def test_config_rejects_bad_values_with_advice(kwargs, words):
    with pytest.raises(ZipqError, match=words):
        DataConfig(**kwargs)


def test_empty_caption_raises(tmp_path):
    good_images(tmp_path, 2)
    with pytest.raises(ZipqError, match="caption"):
        prepare_images(tmp_path, "  ")


def test_summary_counts_and_names_each_skipped_file(tmp_path):
    expected = write_broken_files(tmp_path)
    good_images(tmp_path, 3)

    summary = prepare_images(tmp_path, CAPTION).summary()

    lines = summary.splitlines()
    assert lines[0] == f"3 images ready at 64×64 px, {len(expected)} files skipped:"
    assert sorted(line.split(":")[0] for line in lines[1:]) == sorted(f"- {name}" for name in expected)
    assert ImageSet([], []).summary() == "0 images ready."


def test_prints_nothing_and_warns_nothing(tmp_path, capsys):
    write_broken_files(tmp_path)
    good_images(tmp_path, 2)
    truncated_jpeg(tmp_path / "cut2.jpg")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_images(tmp_path, CAPTION)

    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_aspect_buckets_cover_1_to_2_within_the_pixel_budget(resolution):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= resolution**2 and 0.5 <= w / h <= 2
        assert (h, w) in sizes  # portrait and landscape alike
    assert min(w / h for w, h in sizes) <= 0.6 and max(w / h for w, h in sizes) >= 1.66


def test_nearest_bucket_keeps_the_orientation_and_the_square_stays_square():
    assert nearest_bucket(640, 480, 1024) == (1152, 896)
    assert nearest_bucket(480, 640, 1024) == (896, 1152)
    assert nearest_bucket(3000, 1000, 1024) == (1408, 704)  # past 2:1: the widest bucket
    assert nearest_bucket(500, 500, 1024) == (1024, 1024)


def test_a_square_view_is_the_fitted_view_at_a_square():
    rng = np.random.default_rng(0)
    for w, h in [(301, 100), (97, 203), (640, 480)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        assert np.array_equal(np.asarray(square_view(image, 64)), np.asarray(fit_view(image, 64, 64)[0]))


def test_buckets_keep_each_images_shape_and_tell_sdxl_where_it_came_from(tmp_path):
    solid(tmp_path / "wide.png", size=(400, 200))
    solid(tmp_path / "tall.png", size=(150, 300))
    solid(tmp_path / "square.png", size=(100, 100))
    views = {t.name: t for t in prepare_images(tmp_path, CAPTION, DataConfig(resolution=256, buckets=True)).images}
    assert views["wide.png"].image.size == (320, 192)  # 2:1 asked, the nearest bucket 5:3 (≤ 256² px)
    assert views["tall.png"].image.size == (192, 320)
    # original (h, w), crop (top, left) in the original scaled to cover the view, target (h, w)
    assert views["wide.png"].micro_conditioning() == (200, 400, 0, 32, 192, 320)
    assert views["tall.png"].micro_conditioning() == (300, 150, 32, 0, 320, 192)
    assert views["square.png"].micro_conditioning() == (100, 100, 0, 0, 256, 256)  # a small original says so
    plain = prepare_images(tmp_path, CAPTION, DataConfig(resolution=64))
    assert {t.image.size for t in plain.images} == {(64, 64)} and "at 64×64 px" in plain.summary()
    assert "in 3 aspect-ratio sizes" in prepare_images(tmp_path, CAPTION,
                                                       DataConfig(resolution=256, buckets=True)).summary()
