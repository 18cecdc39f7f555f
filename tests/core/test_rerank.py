"""Best-of-candidates generation: the adapters' evidence, the round layout, and what generate returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zipq_core import GenerateConfig, TrainConfig, ZipqError, generate, load_adapter, load_base, train_adapter
from zipq_core.adapters import load_training_views
from zipq_core.data import DataConfig, prepare_images
from zipq_core.evaluate import load_images
from zipq_core.generation.rerank import (
    STYLE_BAND,
    SUBJECT_BAND,
    WHOLE_BAND,
    Judge,
    best_of,
    candidate_seed,
    evidence,
    judges_for,
    weakest,
)

from helpers import unet_out


@pytest.fixture(scope="module")
def subject(tmp_path_factory, subject_dir):
    """mini and a subject DoRA trained long enough to know its subject (60 steps)."""
    base = load_base("mini")
    cfg = TrainConfig(kind="subject", token="sks", class_noun=subject_dir.name, steps=60, learning_rate=1e-2)
    out = tmp_path_factory.mktemp("rerank") / "subject"
    images = prepare_images(subject_dir, cfg.instance_prompt, DataConfig(), token="sks")
    for _ in train_adapter(base, images, cfg, out):
        pass
    return base, out


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_evidence_is_higher_on_the_adapters_own_concept(subject, style_dir):
    """The subject adapter denoises its training views better, relative to the base, than pictures of a style."""
    base, folder = subject
    adapter = load_adapter(folder)
    views, _ = load_training_views(folder)
    others = load_images(style_dir)
    reference = unet_out(base)
    judge = Judge(adapter, SUBJECT_BAND)
    prompt = adapter.info["instance_prompt"]
    own, foreign = evidence(base, views, judge, prompt), evidence(base, others, judge, prompt)
    assert own.shape == (len(views),) and foreign.shape == (len(others),)
    assert float(own.mean()) > float(foreign.mean())
    assert torch.equal(unet_out(base), reference), "judging must leave the base weights bit for bit"
    assert torch.equal(evidence(base, views, judge, prompt), own), "same seed, same evidence"


def test_best_of_picks_each_image_among_its_own_rounds():
    scores = torch.tensor([0.1, 0.9, 0.5,    # round 0: images 0, 1, 2
                           0.7, 0.2, 0.5])   # round 1
    assert best_of(scores, count=3, rounds=2) == [3, 1, 2]  # a tie keeps the earliest round


def test_a_candidate_scores_its_weakest_concept():
    """Clear on one concept and absent on the other loses to fair on both, whatever the evidence's scale."""
    subject = torch.tensor([3.0, 0.0, 1.5, 0.2])
    style = torch.tensor([0.0, 3.0, 1.5, 0.1]) * 100
    scores = weakest([subject, style])
    assert int(scores.argmax()) == 2
    assert torch.allclose(weakest([subject]), (subject - subject.mean()) / subject.std())
    constant = torch.ones(4)  # a judge that cannot tell the candidates apart scores them all 0
    assert torch.equal(weakest([constant, subject]), torch.zeros(4).minimum(weakest([subject])))


def test_candidates_return_one_of_each_images_own_candidates(subject):
    """candidates=3: image i is image i of one of the three rounds; round 0 is the plain request's image."""
    base, folder = subject
    adapters = [(load_adapter(folder), 1.0)]
    config = GenerateConfig(prompt="a photo of sks heart", seed=5, steps=3, num_images=2)
    plain = _arrays(generate(base, config, adapters))
    rounds = [_arrays(generate(base, GenerateConfig(prompt=config.prompt, seed=candidate_seed(5, k), steps=3,
                                                    num_images=2), adapters)) for k in range(3)]
    assert np.array_equal(rounds[0], plain)
    steps = []
    picked = _arrays(generate(base, GenerateConfig(prompt=config.prompt, seed=5, steps=3, num_images=2, candidates=3),
                              adapters, on_step=lambda i, n: steps.append((i, n))))
    assert picked.shape == plain.shape
    for i in range(2):
        assert any(np.array_equal(picked[i], r[i]) for r in rounds), f"image {i} is none of its candidates"
    assert steps[-2:] == [(9, 10), (10, 10)], "progress counts every round, then the one judge"


def test_without_active_adapters_one_round_is_drawn(subject):
    base, folder = subject
    config = GenerateConfig(prompt="a photo of a star", seed=1, steps=2, num_images=1)
    steps = []
    many = generate(base, GenerateConfig(prompt=config.prompt, seed=1, steps=2, num_images=1, candidates=4),
                    [(load_adapter(folder), 0.0)], on_step=lambda i, n: steps.append(n))
    assert np.array_equal(_arrays(many), _arrays(generate(base, config)))
    assert set(steps) == {2}


def test_judges_follow_the_adapters_kind(subject):
    _, folder = subject
    adapter = load_adapter(folder)
    style = load_adapter(folder)
    style.info = {**style.info, "kind": "style"}
    other = load_adapter(folder)
    other.info = {}
    assert [j.band for j in judges_for([adapter, style, other])] == [SUBJECT_BAND, STYLE_BAND, WHOLE_BAND]


@pytest.mark.parametrize("bad", [0, 9])
def test_candidates_out_of_range_say_so(bad):
    with pytest.raises(ZipqError, match="candidates per image"):
        GenerateConfig(candidates=bad)
