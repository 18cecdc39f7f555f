"""The shipped offline evaluator classifies fresh renders and its metrics have the documented keys."""

import json

import numpy as np
import pytest

from zipq_core.evaluate import load_images
from zipq_mini import evaluator, world


@pytest.fixture(scope="module")
def ev():
    return evaluator.load_evaluator()


def test_classifies_fresh_renders(ev):
    imgs, scenes = world.render_dataset(120, seed=123_456, held_out="any")
    acc = evaluator.accuracy(ev, imgs, world.labels(scenes))
    assert acc["subject"] >= 0.95 and acc["style"] >= 0.93 and acc["colour"] >= 0.93, acc


def test_loader_is_cached(ev):
    assert evaluator.load_evaluator() is ev


def test_predict_and_embed_shapes(ev):
    imgs, _ = world.render_dataset(3, seed=1)
    probs = ev.predict(list(imgs))
    assert set(probs) >= {"subject", "style", "colour"}
    assert probs["subject"].shape == (3, len(world.ALL_SUBJECTS))
    assert np.allclose(probs["style"].sum(1), 1, atol=1e-5)
    e = ev.embed(imgs, "style")
    assert e.shape[0] == 3 and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)


def _save(folder, scenes):
    folder.mkdir()
    for i, s in enumerate(scenes):
        world.render(s).save(folder / f"{i}.png")
    return folder


def test_evaluate_images_keys_and_fidelity(tmp_path, ev):
    rng = np.random.default_rng(5)
    gen = _save(tmp_path / "gen", [world.sample_scene(rng, "any", subject="heart", style="zigzag", colour="red")
                                   for _ in range(4)])
    subj = _save(tmp_path / "subj", [world.sample_scene(rng, "any", subject="heart", style="flat", colour="red")
                                     for _ in range(3)])
    sty = _save(tmp_path / "sty", [world.sample_scene(rng, "any", subject="square", style="zigzag") for _ in range(3)])
    out = evaluator.evaluate_images(gen, subject_ref=subj, style_ref=sty, prompt="a red heart with zigzags")
    json.dumps(out)  # JSON-able
    assert set(out) == {"n_images", "predicted", "subject", "style", "prompt"}
    assert out["n_images"] == 4
    assert out["subject"]["subject"] == "heart" and out["subject"]["acc"] >= 0.75
    assert out["style"]["style"] == "zigzag" and out["style"]["acc"] >= 0.75
    assert set(out["subject"]) == {"subject", "prob", "acc", "cosine"}
    assert out["prompt"]["named"] == {"subject": "heart", "style": "zigzag", "colour": "red"}
    assert out["prompt"]["acc"] >= 0.75
    # a mismatched subject scores lower on both probability and cosine
    other = _save(tmp_path / "other",
                  [world.sample_scene(rng, "any", subject="star", style="zigzag") for _ in range(4)])
    bad = evaluator.subject_fidelity(load_images(other), refs=load_images(subj))
    assert bad["prob"] < out["subject"]["prob"] and bad["cosine"] < out["subject"]["cosine"]


def test_missing_folder_is_a_user_error(tmp_path):
    from zipq_core.errors import ZipqError

    with pytest.raises(ZipqError):
        load_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZipqError):
        load_images(tmp_path / "empty")
