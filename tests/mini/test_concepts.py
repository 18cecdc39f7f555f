"""Concept families and splits: deterministic, distinct, disjoint; example sets in the layout training reads."""

import hashlib
import json

import numpy as np
import pytest

from zipq_mini import concepts, world


def test_world_output_unchanged_by_the_concept_hooks():
    # sha256 of render_dataset(40, 123, "any") before world.render / shape_mask accepted `parts`.
    images, _ = world.render_dataset(40, 123, "any")
    assert hashlib.sha256(images.tobytes()).hexdigest() == (
        "34ee1fbfdae62be14006ca2bc0619395420bcd143c20f8464a02fd84fa6a4530")


def test_splits_have_their_sizes_and_are_deterministic():
    for name, n in concepts.SPLIT_SIZES.items():
        s = concepts.split(name)
        assert len(s.subjects) == n and len(s.styles) == n
        assert len({c.name for c in s.subjects + s.styles}) == 2 * n
    first = concepts.split("test")
    concepts.split.cache_clear()
    assert concepts.split("test") == first
    with pytest.raises(ValueError, match="unknown split"):
        concepts.split("train")


def test_test_subjects_are_unlike_each_other_the_tuning_split_and_the_world():
    test = [c.parts() for c in concepts.split("test").subjects]
    others = [c.parts() for c in concepts.split("tuning").subjects] + [world.shape_parts(s) for s in
                                                                        ("circle", "star", "heart", "cross")]
    for i, a in enumerate(test):
        for b in test[i + 1:] + others:
            assert concepts.silhouette_iou(a, b) <= concepts.MAX_IOU
    assert concepts.silhouette_iou(test[0], test[0]) > 0.99  # the measure sees a shape as itself


def test_test_styles_cover_six_kinds_and_are_unlike_each_other():
    styles = concepts.split("test").styles
    assert {s.kind for s in styles} == set(concepts.TEXTURE_KINDS)
    for i, a in enumerate(styles):
        for b in styles[i + 1:] + concepts.split("tuning").styles:
            assert concepts.spectrum_cosine(a, b) <= concepts.MAX_SPECTRUM_COSINE


def test_texture_period_contrast_and_range():
    style = concepts.StyleConcept("s", "lines", period=8.0, angle=0.0, thickness=0.5, contrast=0.8, jitter=0.0, seed=0)
    p = concepts.texture(style)
    assert p.shape == (256, 256) and p.min() == pytest.approx(0.2) and p.max() == 1.0
    row = p.reshape(64, 4, 64, 4).mean(axis=(1, 3))[10]  # vertical lines: x varies along a row
    assert np.abs(np.fft.rfft(row - row.mean()))[1:].argmax() + 1 == 64 // 8  # 8 periods across 64 px


@pytest.mark.parametrize("per_concept", [2, 4, 6])
def test_pairs_put_every_test_concept_in_the_same_number_of_pairs(per_concept):
    pairs = concepts.pairs("test", per_concept)
    assert len(pairs) == 6 * per_concept and len(set((a.name, b.name) for a, b in pairs)) == len(pairs)
    for group in (concepts.split("test").subjects, concepts.split("test").styles):
        for c in group:
            assert sum(c in pair for pair in pairs) == per_concept
    assert pairs[:12] == concepts.pairs("test")  # more pairs extend the first 12 (shards and prompts keep indices)
    assert [(a.name, b.name) for a, b in pairs[:3]] == [("test_subject_0", "test_style_0"),
                                                        ("test_subject_0", "test_style_1"),
                                                        ("test_subject_1", "test_style_1")]


def test_render_concepts_draws_the_silhouette_and_the_texture():
    subject, style = concepts.split("test").subjects[0], concepts.split("test").styles[0]
    scene = world.Scene("concept", "flat", "blue", "white", 32, 32, 22, 0)
    flat = np.asarray(concepts.render_concepts(scene, subject=subject), dtype=float)
    assert np.array_equal(flat, np.asarray(concepts.render_concepts(scene, subject=subject), dtype=float))
    other = np.asarray(concepts.render_concepts(scene, subject=concepts.split("test").subjects[1]), dtype=float)
    assert np.abs(flat - other).mean() > 3
    textured = np.asarray(concepts.render_concepts(scene, subject=subject, style=style), dtype=float)
    inside = world.shape_mask(scene, subject.parts()).reshape(64, 4, 64, 4).mean(axis=(1, 3)) > 0.99
    assert flat[inside].std(axis=0).max() < 1 and textured[inside].std(axis=0).mean() > 10  # the texture shows


def test_example_sets_train_through_prepare_images(tmp_path):
    from zipq_core.data import DataConfig, prepare_images

    subject, style = concepts.split("test").subjects[2], concepts.split("test").styles[2]
    folder = concepts.write_example_set(subject, tmp_path / "subject")
    images = prepare_images(folder, "a photo of sks shape", DataConfig(), token="sks")
    assert len(images.images) == 5 and not images.rejected
    assert all("sks shape with a flat fill on a" in im.caption for im in images.images)
    folder = concepts.write_example_set(style, tmp_path / "style")
    images = prepare_images(folder, "a picture in zkz style", DataConfig(), token="zkz")
    assert len(images.images) == 3 and all(im.caption.endswith("in zkz style") for im in images.images)
    saved = json.loads((folder / "concept.json").read_text())
    assert saved["concept"]["name"] == style.name and len(saved["scenes"]) == 3
    again = concepts.example_set(style)
    assert np.array_equal(np.asarray(again[0].image), np.asarray(concepts.example_set(style)[0].image))


def test_training_pool_keeps_every_scored_concept_unseen():
    """The base model's family pool: no near copy of a split's subject or style, nor of a held-out world one."""
    subjects, styles = concepts.training_pool(seed=77, sizes=(40, 30))
    scored = [c.parts() for name in concepts.SPLIT_SEEDS for c in concepts.split(name).subjects]
    scored += [world.shape_parts(s) for s in world.HELDOUT_SUBJECTS]
    for c in subjects[:12]:  # the exact 256 px test the splits use, on a sample (it is slow)
        assert max(concepts.silhouette_iou(c.parts(), other) for other in scored) <= concepts.MAX_IOU + 0.02
    for c in styles:
        for other in (s for name in concepts.SPLIT_SEEDS for s in concepts.split(name).styles):
            assert concepts.spectrum_cosine(c, other) <= concepts.MAX_SPECTRUM_COSINE
    with pytest.raises(ValueError, match="split's seed"):
        concepts.training_pool(seed=concepts.SPLIT_SEEDS["test"])


def test_family_captions_never_name_a_world_style_or_a_held_out_subject():
    """Family images teach words of their own: the world's held-out styles (grid, bullseye…) stay unnamed."""
    images, captions = concepts.render_family_dataset(60, seed=5)
    again, captions2 = concepts.render_family_dataset(60, seed=5, workers=2)  # rendered in two processes
    assert images.shape == (60, 64, 64, 3) and np.array_equal(images, again) and captions == captions2
    family = [c for c in captions if " shape" in c and any(w in c for w in concepts.KIND_WORDS.values())]
    assert family  # some images are family subject and family texture
    for text in family:
        parsed = world.parse_prompt(text)
        assert parsed["subject"] is None and parsed["style"] is None, text
    held_out_words = [w for s in world.HELDOUT_STYLES + world.HELDOUT_SUBJECTS
                      for w in world.SUBJECT_WORDS.get(s, []) + list(world.STYLE_WORDS.get(s, ()))]
    assert not any(w in text for text in captions for w in held_out_words)
