"""bench/merge_recipe.py on tiny settings: every variant is a valid merge, the pairs are the tuning split's, and the
report's differences are paired against the direct merge's same row."""


import numpy as np
import pytest

from zipq_core.config import MergeConfig
from zipq_mini import concepts

from helpers import bench_module


@pytest.fixture(scope="module")
def recipe():
    with bench_module("merge_recipe") as module:
        yield module


def test_variants_are_merges_and_pairs_come_from_the_tuning_split(recipe):
    for fields in recipe.VARIANTS.values():
        MergeConfig(**fields)  # raises on a field or value the core does not take
    assert recipe.VARIANTS["zipq"] == {} and recipe.VARIANTS["direct"] == {"method": "direct"}
    names = [recipe.pair_name(p, 2) for p in recipe.tasks(2)]
    assert len(names) == 8 and all(n.startswith("tuning_subject_") and "__tuning_style_" in n for n in names)
    test_names = {c.name for c in (*concepts.split("test").subjects, *concepts.split("test").styles)}
    assert not any(part in test_names for n in names for part in n.split("__"))


def test_report_differences_are_paired_with_the_direct_rows(recipe):
    rng = np.random.default_rng(0)

    def scores(shift):
        return {m: rng.normal(0.5, 0.05, 16) + shift for m in recipe.METRICS}

    data = {f"pair{i}": {"direct_app": scores(0.0), "direct_file": scores(0.0)} for i in range(3)}
    for pair in data.values():
        pair["zipq_app"] = {m: v + 0.1 for m, v in pair["direct_app"].items()}  # exactly 0.1 above, image for image
    result = recipe.report(data, ["direct", "zipq"], resamples=200)
    diff = result["differences"]["zipq_app - direct_app"]["subject_fidelity"]
    assert diff["mean"] == pytest.approx(0.1) and diff["half_width"] == pytest.approx(0.0, abs=1e-12)
    assert "zipq_file - direct_file" not in result["differences"]  # no zipq file rows: nothing to compare
    assert set(result["rows"]) == {"direct_app", "direct_file", "zipq_app"}
    assert "| zipq_app - direct_app |" in recipe.markdown(result)
