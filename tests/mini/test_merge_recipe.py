"""bench/merge_recipe.py on tiny settings: every variant is a valid merge, the pairs are the tuning split's, and the
report's differences are paired against the direct merge's same row."""

import argparse
import sys

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


def test_slider_rows_name_each_triple_and_refuse_a_bad_one(recipe):
    rows = recipe.slider_rows("1.5/1.5/1,1/1/1")
    assert list(rows) == ["app_1.5_1.5_1", "app_1_1_1"]
    assert (rows["app_1.5_1.5_1"].subject, rows["app_1.5_1.5_1"].style, rows["app_1.5_1.5_1"].subject_detail) \
        == (1.5, 1.5, 1.0)
    assert recipe.slider_rows("") == {}
    with pytest.raises(SystemExit, match="triples"):
        recipe.slider_rows("1.5/1.5")
    with pytest.raises(Exception, match="strength"):
        recipe.slider_rows("9/1/1")  # beyond the sliders' range: Sliders refuses it
    # a row belongs to exactly one variant: zipq's rows are not zipq_keep10's, nor the other way round
    assert recipe.row_of("zipq", "zipq_app_1_1_1") == "app_1_1_1" and recipe.row_of("zipq", "zipq_keep10_app") is None
    assert recipe.row_of("zipq_keep10", "zipq_keep10_file") == "file"
    assert recipe.row_of("subject_only", "subject_only_app") == "app"


def test_slider_rows_compare_with_the_direct_merge_at_the_same_sliders_and_report_what_they_keep(recipe):
    rng = np.random.default_rng(1)

    def scores(level):
        return {m: rng.normal(0.0, 0.01, 8) + level for m in recipe.METRICS}

    app = recipe.Sliders()
    default = recipe.slider_row(app)
    assert default == f"app_{app.subject:g}_{app.style:g}_{app.subject_detail:g}" and default != "app_1_1_1"
    data = {f"pair{i}": {"direct_app_1_1_1": scores(0.2), "zipq_app_1_1_1": scores(0.3), f"direct_{default}":
                         scores(0.1), "subject_only_app": scores(0.4), "style_only_app": scores(0.6)}
            for i in range(2)}
    result = recipe.report(data, ["direct", "zipq"], resamples=100)
    # paired with the direct merge at the same sliders, and with the same merge at the default sliders
    assert set(result["differences"]) == {"zipq_app_1_1_1 - direct_app_1_1_1", f"direct_app_1_1_1 - direct_{default}"}
    assert result["differences"][f"direct_app_1_1_1 - direct_{default}"]["subject_fidelity"]["mean"] \
        == pytest.approx(0.1, abs=0.02)
    diff = result["differences"]["zipq_app_1_1_1 - direct_app_1_1_1"]["style_fidelity"]["mean"]
    assert diff == pytest.approx(0.1, abs=0.02)
    keeps = result["keeps"]["zipq_app_1_1_1"]
    assert keeps["subject_fidelity"] == pytest.approx(0.3 / 0.4, abs=0.05)
    assert keeps["style_fidelity"] == pytest.approx(0.3 / 0.6, abs=0.05)
    assert "subject_only_app" not in result["keeps"] and "subject_only_app" in result["rows"]
    assert "| zipq_app_1_1_1 |" in recipe.markdown(result) and "×" in recipe.markdown(result)
    for pair in data.values():  # a recipe is compared with the direct merge and with the default ZipQDoRA
        pair["zipq_keep10_app_1_1_1"] = {m: v + 0.05 for m, v in pair["zipq_app_1_1_1"].items()}
    result = recipe.report(data, ["direct", "zipq", "zipq_keep10"], resamples=100)
    assert result["differences"]["zipq_keep10_app_1_1_1 - zipq_app_1_1_1"]["subject_fidelity"]["mean"] \
        == pytest.approx(0.05)
    assert "zipq_keep10_app_1_1_1 - direct_app_1_1_1" in result["differences"]


def test_a_pair_generates_each_rows_adapters_once_and_resumes(recipe, tmp_path, monkeypatch):
    """Rows as the test protocol makes them (training, merging and sampling stubbed): the single adapters and each
    variant at the app's sliders with mini's candidates, its merged file alone at 1 with one candidate; a second run
    finds every row done and generates nothing."""
    fidelity = sys.modules["fidelity"]
    sampled, merged = {}, []
    dirs = {"subject_dora": tmp_path / "s", "style_dora": tmp_path / "t"}
    monkeypatch.setattr(recipe, "concept_adapters", lambda *a, **k: dirs)
    monkeypatch.setattr(recipe, "merge", lambda base, method, d, seed, args, out, fields:
                        merged.append(out.name) or {"dir": str(out)})
    monkeypatch.setattr(recipe, "slider_adapters", lambda out, *sliders: [(f"parts of {out.name}", sliders)])
    monkeypatch.setattr(fidelity, "load_adapter", lambda path: str(path))

    def sample(base, groups, seed, images, adapters, candidates):
        sampled[len(sampled)] = (adapters, candidates)
        return np.zeros((images, 64, 64, 3), np.uint8)

    monkeypatch.setattr(recipe, "sample", sample)
    args = argparse.Namespace(work=tmp_path, per_concept=1, steps=4, style_steps=2, lr_schedule="cosine", images=2,
                              sliders="", singles=True)
    recipe.run_pair(None, 0, ["direct", "zipq"], args)
    best_of, app = recipe.FAMILY_DEFAULTS["mini"].candidates, recipe.slider_row(recipe.Sliders())
    work = tmp_path / recipe.pair_name(0, 1)
    assert sorted(p.stem for p in work.glob("*.npy")) == sorted(
        ["subject_only_app", "style_only_app", f"direct_{app}", "direct_file", f"zipq_{app}", "zipq_file"])
    assert sampled[0] == ([(str(dirs["subject_dora"]), 1.0)], best_of) and merged == ["merged_direct", "merged_zipq"]
    file = str(work / "merged_zipq" / "pytorch_lora_weights.safetensors")
    assert (sampled[4][1], sampled[5]) == (best_of, ([(file, 1.0)], 1))
    recipe.run_pair(None, 0, ["direct", "zipq"], args)
    assert len(sampled) == 6 and merged == ["merged_direct", "merged_zipq"]
