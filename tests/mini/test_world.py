"""The procedural world: deterministic, every class renders distinctly, captions parse back."""

import numpy as np
import pytest

from zipq_mini import world


def test_render_is_deterministic():
    s = world.sample_scene(np.random.default_rng(0))
    a, b = np.asarray(world.render(s)), np.asarray(world.render(s))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    s2 = world.sample_scene(np.random.default_rng(0))
    assert s2 == s


def test_public_lists():
    assert len(world.SUBJECTS) >= 8 and len(world.HELDOUT_SUBJECTS) >= 4
    assert len(world.STYLES) >= 6 and len(world.HELDOUT_STYLES) >= 4
    assert len(world.COLOURS) >= 8 and len(world.BACKGROUNDS) >= 3
    assert not set(world.SUBJECTS) & set(world.HELDOUT_SUBJECTS)
    assert not set(world.STYLES) & set(world.HELDOUT_STYLES)
    assert not set(world.COLOURS) & set(world.BACKGROUNDS)  # parse_prompt relies on it


@pytest.mark.parametrize("subject", world.ALL_SUBJECTS)
def test_every_subject_renders_a_distinct_silhouette(subject):
    scene = world.Scene(subject, "flat", "red", "white", 32, 32, 22, 0)
    mask = world.shape_mask(scene)
    assert 0.05 < mask.mean() < 0.6  # visible, inside the frame
    for other in world.ALL_SUBJECTS:
        if other != subject:
            m2 = world.shape_mask(world.Scene(other, "flat", "red", "white", 32, 32, 22, 0))
            iou = (np.minimum(mask, m2).sum()) / np.maximum(mask, m2).sum()
            assert iou < 0.9, (subject, other)


@pytest.mark.parametrize("style", world.ALL_STYLES)
def test_every_style_renders_and_differs(style):
    base = np.asarray(world.render(world.Scene("square", style, "blue", "white", 32, 32, 24, 0)), dtype=float)
    assert base.std() > 10
    for other in world.ALL_STYLES:
        if other != style:
            o = np.asarray(world.render(world.Scene("square", other, "blue", "white", 32, 32, 24, 0)), dtype=float)
            assert np.abs(o - base).mean() > 3, (style, other)


def test_heldout_never_sampled_for_base():
    rng = np.random.default_rng(1)
    scenes = [world.sample_scene(rng, held_out=False) for _ in range(2000)]
    assert {s.subject for s in scenes} == set(world.SUBJECTS)
    assert {s.style for s in scenes} == set(world.STYLES)
    held = [world.sample_scene(rng, held_out=True) for _ in range(300)]
    assert all(s.subject in world.HELDOUT_SUBJECTS or s.style in world.HELDOUT_STYLES for s in held)
    anys = [world.sample_scene(rng, held_out="any") for _ in range(2000)]
    assert {s.subject for s in anys} == set(world.ALL_SUBJECTS)


def test_captions_parse_back():
    rng = np.random.default_rng(2)
    for _ in range(500):
        s = world.sample_scene(rng, held_out="any")
        text = world.caption(s, rng)
        p = world.parse_prompt(text)
        assert (p["subject"], p["style"], p["colour"]) == (s.subject, s.style, s.colour), text
        assert p["background"] in (None, s.background), text


def test_parse_prompt_free_text():
    assert world.parse_prompt("A Red STAR with stripes on a grey background") == {
        "subject": "star", "style": "stripes", "colour": "red", "background": "gray"}
    assert world.parse_prompt("a photo of sks heart in zigzag style")["style"] == "zigzag"
    assert world.parse_prompt("something else entirely") == {
        "subject": None, "style": None, "colour": None, "background": None}


def test_render_dataset_and_labels():
    imgs, scenes = world.render_dataset(5, seed=3)
    assert imgs.shape == (5, 64, 64, 3)
    lab = world.labels(scenes)
    assert [world.ALL_SUBJECTS[i] for i in lab["subject"]] == [s.subject for s in scenes]
    again, same_scenes = world.render_dataset(5, seed=3, workers=2)  # rendered in two processes: the same data
    assert (again == imgs).all() and same_scenes == scenes


def test_bundled_examples_match_their_scenes_and_captions():
    """assets/examples is what scripts/render_examples.py renders: held-out concepts, sidecars naming the rest."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from zipq_core.data import prepare_images

    root = Path(__file__).resolve().parents[2] / "assets" / "examples"
    for kind, names in (("subjects", world.HELDOUT_SUBJECTS), ("styles", world.HELDOUT_STYLES)):
        for name in names:
            folder = root / kind / name
            scenes = [world.Scene(**s) for s in json.loads((folder / "scenes.json").read_text())]
            assert (len(scenes) == 5) if kind == "subjects" else (len(scenes) == 4)
            for i, scene in enumerate(scenes):
                assert (scene.subject if kind == "subjects" else scene.style) == name
                rendered = np.asarray(world.render(scene), dtype=np.int16)
                assert np.abs(rendered - np.asarray(Image.open(folder / f"{i}.png"), dtype=np.int16)).max() <= 1
            captions = [t.caption for t in prepare_images(folder, "a photo of sks thing", token="sks").images]
            if kind == "subjects":  # the rendering is named, so the adapter binds the shape to the token
                assert captions[0] == f"a photo of sks thing, with {world.STYLE_WORDS[scenes[0].style][1]}"
            else:  # the things pictured are named, so the adapter binds the look to the token
                assert all(world.SUBJECT_WORDS[s.subject][0] in c and s.colour in c for s, c in zip(scenes, captions))
