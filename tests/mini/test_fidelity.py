"""bench/fidelity.py on tiny settings: shards partition and resume, prompts parse back, the report scores and
bootstraps finished shards (a full shard trains and generates for minutes: the benchmark runs that, not CI)."""

import json
from pathlib import Path

import numpy as np
import pytest

from zipq_mini import concepts, world

from helpers import bench_module


@pytest.fixture(scope="module")
def fidelity():
    with bench_module("fidelity") as module:
        yield module


def test_parts_partition_the_shards(fidelity):
    tasks = fidelity.shard_tasks(2, per_concept=2)
    assert len(tasks) == 24 and len({fidelity.shard_name(*t) for t in tasks}) == 24
    parts = [fidelity.my_tasks(tasks, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(t for p in parts for t in p) == sorted(tasks) and sum(map(len, parts)) == 24
    with pytest.raises(SystemExit, match="i/n"):
        fidelity.my_tasks(tasks, "4/3")


@pytest.mark.parametrize("per_concept,n", [(2, 2), (4, 2), (4, 3)])
def test_parts_by_subject_give_each_process_whole_subjects(fidelity, per_concept, n):
    """With the subject as the group, every shard of a subject runs in one part (its adapter trains once, never
    in two processes at a time), the parts still partition the shards, and they stay balanced."""
    tasks = fidelity.shard_tasks(1, per_concept)
    parts = [fidelity.my_tasks(tasks, f"{i}/{n}", group=fidelity.subject_of) for i in range(1, n + 1)]
    assert sorted(t for p in parts for t in p) == sorted(tasks)
    owners = [{fidelity.subject_of(t) for t in p} for p in parts]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])
    assert {len(p) for p in parts} == {len(tasks) // n}
    for p in parts:  # a subject's shards one after another, each subject's in the protocol's order
        subjects = [fidelity.subject_of(t) for t in p]
        assert all(a == b or b not in subjects[:k] for k, (a, b) in enumerate(zip(subjects, subjects[1:]), 1))
        assert all(sorted(g, key=tasks.index) == g for g in ([t for t in p if fidelity.subject_of(t) == s]
                                                             for s in set(subjects)))


def test_a_concept_in_several_pairs_trains_its_adapter_once(fidelity, tmp_path, monkeypatch):
    """Shards share a concept's adapter: trained once per seed and settings, and a second process that wants it
    while it trains waits for it and then reuses it (no second training, no half-written folder)."""
    import threading
    import time

    trained = []
    training = threading.Event()

    def train(base, kind, folder, out, **settings):
        if not (out / "done").is_file():
            training.set()
            time.sleep(0.3)  # long enough for the other thread to arrive and wait
            trained.append((kind, out.parent.name, settings["steps"]))
            out.mkdir(parents=True, exist_ok=True)
            (out / "done").write_text("")
        return out

    monkeypatch.setattr(fidelity, "train_concept_adapter", train)
    (s0, t0), (_, t1) = concepts.pairs("test", 2)[:2]
    first = fidelity.concept_adapters(None, s0, t0, 0, tmp_path, ("dora",), shared=True, steps=3)
    again = fidelity.concept_adapters(None, s0, t1, 0, tmp_path, ("dora",), shared=True, steps=3)
    assert first["subject_dora"] == again["subject_dora"] and first["style_dora"] != again["style_dora"]
    assert [k for k, *_ in trained] == ["subject", "style", "style"]
    assert (tmp_path / f"{s0.name}__seed0" / "examples" / "concept.json").is_file()
    other = fidelity.concept_adapters(None, s0, t1, 0, tmp_path, ("dora",), shared=True, steps=4)
    assert other["subject_dora"] != first["subject_dora"] and len(trained) == 5  # other settings: other adapters
    trained.clear()
    training.clear()
    got = []
    waiter = threading.Thread(target=lambda: (training.wait(), got.append(
        fidelity.shared_adapter(None, t0, "style", 1, tmp_path, method="dora", steps=3))))
    waiter.start()
    mine = fidelity.shared_adapter(None, t0, "style", 1, tmp_path, method="dora", steps=3)
    waiter.join(timeout=10)
    assert got == [mine] and trained == [("style", f"{t0.name}__seed1", 3)]


@pytest.mark.parametrize("per_concept", [2, 3, 4])
def test_more_pairs_per_concept_keep_the_first_shards(fidelity, per_concept):
    """A wider protocol adds shards; the pairs of a narrower one keep their index (their prompts) and names."""
    tasks = fidelity.shard_tasks(1, per_concept)
    names = [fidelity.shard_name(*t) for t in tasks]
    assert len(set(names)) == len(tasks) == 6 * per_concept
    assert set(fidelity.shard_tasks(1, 2)) <= set(tasks) and tasks[:12] == [(p, 0) for p in range(12)]
    for (pair, _), name in zip(tasks, names):
        subject, style = fidelity.all_pairs()[pair]
        assert name.startswith(f"{subject.name}__{style.name}__")


def test_rows_are_equal_compute_plus_static_files(fidelity):
    assert {"subject_only", "style_only", "direct", "zip", "zipq", "ties", "dare", "blora"} <= set(fidelity.ROWS)
    assert {f"{m}_file" for m in fidelity.MERGES} <= set(fidelity.ROWS) and "klora_file" not in fidelity.ROWS


def test_prompts_name_a_colour_and_background_the_evaluator_reads(fidelity):
    groups = fidelity.prompts(3, 0, 20)
    assert len(groups) == 3 and groups == fidelity.prompts(3, 0, 20) and groups != fidelity.prompts(4, 0, 20)
    for colour, background in groups:
        parsed = world.parse_prompt(fidelity.PROMPT.format(colour=colour, background=background))
        assert parsed["colour"] == colour and parsed["background"] == background and parsed["subject"] is None


def test_bootstrap_intervals(fidelity):
    flat = fidelity.bootstrap([np.full(8, 0.5), np.full(8, 0.5)], resamples=200)
    assert flat["mean"] == 0.5 and flat["half_width"] == 0.0 and flat["images"] == 16
    rng = np.random.default_rng(0)
    one = fidelity.bootstrap([rng.normal(0.4, 0.1, 32)], resamples=500)
    assert 0.02 < one["half_width"] < 0.05  # images alone: about 1.96 * 0.1 / sqrt(32)
    spread = fidelity.bootstrap([rng.normal(m, 0.1, 32) for m in (0.2, 0.4, 0.6)], resamples=500)
    assert spread["low"] < spread["mean"] < spread["high"] and spread["half_width"] > 0.1  # pairs differ: wider


def test_sizing_splits_the_bootstraps_variance_and_says_what_reaches_the_target(fidelity):
    rng = np.random.default_rng(1)
    pairs = [rng.normal(m, 0.5, 32) for m in rng.normal(0.0, 0.1, 24)]  # between 0.01, within 0.25
    s = fidelity.sizing(pairs)
    assert 0.004 < s["between"] < 0.025 and 0.2 < s["within"] < 0.3
    boot = fidelity.bootstrap(pairs, resamples=1000)
    assert abs(s["half_width_now"] - boot["half_width"]) < 0.15 * boot["half_width"]  # the bootstrap's own variance
    assert s["floor"] > 0.03 and s["images_per_pair"] is None  # the pairs differ: more images cannot get there
    grown = [rng.normal(m, 0.5, 32) for m in rng.normal(0.0, 0.1, s["pairs"])]
    assert fidelity.bootstrap(grown, resamples=1000)["half_width"] <= 0.033  # more pairs can
    flat = [rng.normal(0.0, 0.5, 32) for _ in range(24)]  # no pair effect: images alone get there
    f = fidelity.sizing(flat)
    assert f["images_per_pair"] is not None and f["images_per_pair"] > 32
    more = [rng.normal(0.0, 0.5, f["images_per_pair"]) for _ in range(24)]
    assert fidelity.bootstrap(more, resamples=1000)["half_width"] <= 0.033


def _fake_shard(shards: Path, pair: int, good: list, bad: list, groups: list[tuple[str, str]]) -> None:
    subject, style = concepts.pairs("test")[pair]
    rows = {"zipq": good, "direct": bad, "zipq_file": good, "direct_file": good}
    np.savez_compressed(shards / f"{fidelity_name(pair)}.npz",
                        **{k: np.stack([np.asarray(im) for im in v]) for k, v in rows.items()})
    meta = {"subject": subject.name, "style": style.name, "pair": pair, "seed": 0, "rows": list(rows),
            "groups": [{"colour": c, "background": b} for c, b in groups]}
    (shards / f"{fidelity_name(pair)}.json").write_text(json.dumps(meta))


def fidelity_name(pair: int) -> str:
    subject, style = concepts.pairs("test")[pair]
    return f"{subject.name}__{style.name}__seed0"


def test_report_scores_finished_shards_and_bootstraps_differences(fidelity, tmp_path):
    from zipq_mini.evaluator import load_evaluator
    from zipq_mini.judge import load_judge

    groups = [("red", "white")]
    # Pairs whose subject is broad enough to show the texture (a spiky subject hides rings from the style
    # judge too, which the benchmark's figures then show: this test is about the report, not the judge).
    for pair in (0, 1):
        subject, style = concepts.pairs("test")[pair]
        other_subject, other_style = concepts.pairs("test")[pair + 4]
        rng = np.random.default_rng(pair)

        def draw(s, t, rng=rng):
            scenes = [concepts.random_scene(rng, colour="red", background="white", large=True) for _ in range(8)]
            return [concepts.render_concepts(scene, s, t) for scene in scenes]

        _fake_shard(tmp_path, pair, draw(subject, style), draw(other_subject, other_style), groups)
    (tmp_path / "unfinished.npz").write_bytes(b"")  # a shard without its .json is not scored
    (tmp_path / "report.json").write_text("{}")  # nor a report written beside the shards
    scores = fidelity.load_scores(tmp_path, load_judge(), load_evaluator())
    assert len(scores) == 2 and all(len(s["zipq"]["subject_id"]) == 8 for s in scores.values())
    assert all((s["zipq"]["seed"] == 0).all() for s in scores.values())
    result = fidelity.report(scores, resamples=200)
    rows = result["rows"]
    assert rows["zipq"]["subject_id"]["mean"] >= 0.9 and rows["zipq"]["style_id"]["mean"] >= 0.75
    assert rows["direct"]["subject_id"]["mean"] <= 0.1
    assert rows["zipq"]["text"]["mean"] >= 0.75  # clean renders in the prompt's colour and background
    diff = result["differences"]["zipq - direct"]
    assert diff["subject_fidelity"]["low"] > 0.2 and diff["style_fidelity"]["low"] > 0.2
    same = result["differences"]["zipq_file - direct_file"]["style_fidelity"]
    assert same["mean"] == 0.0 and same["half_width"] == 0.0  # identical rows: a paired difference of exactly 0
    assert "zipq - klora" not in result["differences"]  # rows that no shard has are left out
    assert sorted(result["per_pair"]) == result["pairs"]
    for v in result["per_pair"].values():  # the per-pair means behind the pooled difference
        assert v["images"] == 8 and v["zipq - direct"]["subject_fidelity"] > 0.2
        assert v["zipq_file - direct_file"]["style_fidelity"] == 0.0
    assert set(result["sizing"]) == {"zipq - direct", "zipq_file - direct_file"}  # the comparisons these shards hold
    assert "| zipq - direct |" in fidelity.markdown(result) and "| images |" in fidelity.markdown(result)
    assert "with unlimited images" in fidelity.markdown(result)


def test_a_row_on_fewer_seeds_is_compared_on_the_seeds_it_has(fidelity):
    """--add without --seeds 2 leaves another recipe's rows on seed 0 only while the shard's rows have two seeds: the
    report pairs them on seed 0 (not a shape error, not a wrong pairing)."""
    two = np.repeat([0, 1], 4)

    def row(values, seeds):
        values = np.asarray(values, dtype=np.float64)
        return {**{m: values for m in fidelity.METRICS}, "seed": seeds}

    scores = {f"pair {k}": {"zipq": row([k + 0.5] * 4 + [k + 0.9] * 4, two),
                            "direct": row([k + 0.25] * 4 + [k + 0.0] * 4, two),
                            "other": row([k + 0.75] * 4, np.zeros(4, int))} for k in range(2)}
    result = fidelity.report(scores, resamples=50)
    other = result["differences"]["other - direct"]["subject_fidelity"]
    assert other["mean"] == pytest.approx(0.5) and other["images"] == 8  # seed 0 only: 0.75 − 0.25
    both = result["differences"]["zipq - direct"]["subject_fidelity"]
    assert both["mean"] == pytest.approx(0.575) and both["images"] == 16  # (0.25 · 4 + 0.9 · 4) / 8
    assert result["per_pair"]["pair 0"]["other - direct"]["subject_fidelity"] == pytest.approx(0.5)


def test_run_shards_resumes_past_finished_shards(fidelity, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(fidelity, "load_mini_base", lambda weights: None)
    monkeypatch.setattr(fidelity, "mini_fingerprint", lambda base: "aaaa")
    monkeypatch.setattr(fidelity, "run_shard", lambda base, pair, seed, args, shards: ran.append((pair, seed)) or
                        shards / "x.json")
    (tmp_path / f"{fidelity.shard_name(0, 0)}.json").write_text("{}")
    (tmp_path / f"{fidelity.shard_name(4, 0)}.json").write_text("{}")
    (tmp_path / "mini.json").write_text('{"fingerprint": "aaaa"}')

    class Args:
        shards, part, seeds, per_concept, mini, add, recipe = tmp_path, "1/2", 1, 2, None, None, ""
        methods = fidelity.MERGES + fidelity.LIVE

    fidelity.run_shards(Args)
    assert ran == [(1, 0), (5, 0), (8, 0), (9, 0)]  # part 1 of 2: subjects 0, 2, 4 (pairs 0–1, 4–5, 8–9)
    monkeypatch.setattr(fidelity, "run_extra", lambda base, pair, seed, label, recipe, shards:
                        ran.append((pair, seed, label, recipe)) or shards / "x.json")
    (tmp_path / f"{fidelity.extra_name(0, 0, 'other')}.json").write_text("{}")
    Args.add, Args.recipe = "other", "lam=0,balance=relative,steps=200"
    fidelity.run_shards(Args)  # another recipe's rows: only for finished shards that lack them
    assert ran[4:] == [(4, 0, "other", {"lam": 0, "balance": "relative", "steps": 200})]


def test_another_recipes_rows_join_their_shard_in_the_report(fidelity, tmp_path, monkeypatch):
    """--add LABEL takes the shard's adapters (trained again where they are gone), merges with the recipe and
    generates its two rows; the direct file's row, generated again, tells whether the adapters were the shard's own;
    the report compares the rows."""
    from zipq_mini.evaluator import load_evaluator
    from zipq_mini.judge import load_judge

    subject, style = concepts.pairs("test")[0]
    other_subject, other_style = concepts.pairs("test")[4]
    rng = np.random.default_rng(0)
    scenes = [concepts.random_scene(rng, colour="red", background="white", large=True) for _ in range(8)]
    good = [np.asarray(concepts.render_concepts(scene, subject, style)) for scene in scenes]
    bad = [np.asarray(concepts.render_concepts(scene, other_subject, other_style)) for scene in scenes]
    _fake_shard(tmp_path, 0, good, bad, [("red", "white")])
    meta_path = tmp_path / f"{fidelity_name(0)}.json"
    meta = json.loads(meta_path.read_text())
    meta.update(images=8, settings={"steps": "300", "lr": "0.003", "merge_steps": "100", "merge_lr": "0.003"})
    meta_path.write_text(json.dumps(meta))
    merged = []
    trained = []  # a shard from before --lr-schedule was recorded ran at a constant rate: retrained so
    monkeypatch.setattr(fidelity, "train_concept_adapter",
                        lambda base, kind, folder, out, **settings: trained.append(settings) or out)
    step = type("Step", (), {"elapsed": 0.0, "summary": {}})
    monkeypatch.setattr(fidelity, "merge_adapters", lambda base, s, t, cfg, out: merged.append(cfg) or [step])
    monkeypatch.setattr(fidelity, "row_adapters", lambda base, row, dirs, m: (row, 1, None))
    rows = {"direct_file": np.stack(bad), "better": np.stack(good), "better_file": np.stack(bad)}
    monkeypatch.setattr(fidelity, "sample", lambda base, groups, seed, images, adapters, candidates: rows[adapters])
    fidelity.run_extra(None, 0, 0, "better", {"lam": 0.0}, tmp_path)
    assert [(c.method, c.lam, c.steps) for c in merged] == [("direct", 0.01, 100), ("zipq", 0.0, 100)]
    assert [(t["steps"], t["learning_rate"], t["lr_schedule"]) for t in trained] == [(300, 0.003, "constant")] * 2
    trained.clear()  # a shard from before --style-steps trained its style with --steps (above), a later one not
    meta["settings"]["style_steps"] = "50"
    meta_path.write_text(json.dumps(meta))
    rows.update(other=np.stack(good), other_file=np.stack(bad))
    fidelity.run_extra(None, 0, 0, "other", {"lam": 0.0}, tmp_path)
    assert [t["steps"] for t in trained] == [300, 50]
    extra = json.loads((tmp_path / f"{fidelity.extra_name(0, 0, 'better')}.json").read_text())
    assert extra["rows"] == ["better", "better_file"] and not any((tmp_path / "work").glob("*"))
    # the stored direct_file row was `good`, the one made again is `bad`: the adapters were not reproduced
    assert extra["direct_file_max_difference"] > 0
    result = fidelity.report(fidelity.load_scores(tmp_path, load_judge(), load_evaluator()), resamples=100)
    assert len(result["pairs"]) == 1 and {"better", "better_file"} <= set(result["rows"])
    assert result["differences"]["better - zipq"]["subject_fidelity"]["mean"] == 0.0  # both rows are `good`
    assert result["differences"]["better_file - direct_file"]["subject_fidelity"]["mean"] < -0.2
    assert "better_file - direct_file" in next(iter(result["per_pair"].values()))
    assert "| better - direct |" in fidelity.markdown(result)


def test_a_shard_resumes_its_rows_and_writes_its_json_last(fidelity, tmp_path, monkeypatch):
    sampled = []

    def fake_sample(base, groups, seed, images, adapters, candidates, schedule=None):
        if len(sampled) == 3 and not (tmp_path / "interrupted").exists():
            (tmp_path / "interrupted").write_text("")
            raise KeyboardInterrupt  # the run is stopped in the middle of the 4th row
        sampled.append(adapters)
        return np.full((images, 64, 64, 3), len(sampled), np.uint8)

    trained = []
    monkeypatch.setattr(fidelity, "train_concept_adapter",
                        lambda base, kind, folder, out, **settings: trained.append((kind, settings["steps"])) or out)
    monkeypatch.setattr(fidelity, "merge", lambda base, method, dirs, seed, args, out: {"dir": str(out)})
    monkeypatch.setattr(fidelity, "row_adapters", lambda base, row, dirs, merged: (row, 1, None))
    monkeypatch.setattr(fidelity, "sample", fake_sample)

    class Args:
        images, steps, style_steps, lr, lr_schedule = 3, 4, 2, 1e-3, "constant"
        methods = fidelity.MERGES + fidelity.LIVE

    name = fidelity.shard_name(5, 0)
    with pytest.raises(KeyboardInterrupt):
        fidelity.run_shard(None, 5, 0, Args, tmp_path)
    assert not (tmp_path / f"{name}.json").exists() and len(list((tmp_path / "work" / name / "rows").glob("*"))) == 3
    fidelity.run_shard(None, 5, 0, Args, tmp_path)
    assert sampled == fidelity.ROWS  # every row sampled once: the three finished ones were not redone
    assert set(trained) == {("subject", 4), ("style", 2)}  # --style-steps is the style adapters' own
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    data = np.load(tmp_path / f"{name}.npz")
    assert meta["rows"] == fidelity.ROWS and all(data[row].shape == (3, 64, 64, 3) for row in fidelity.ROWS)
    assert data[fidelity.ROWS[3]][0, 0, 0, 0] == 4 and not (tmp_path / "work" / name).exists()


def test_a_quick_look_with_fewer_methods_keeps_to_its_own_folder(fidelity, tmp_path, monkeypatch):
    """--methods direct,zipq: the single adapters, those merges and their files; DoRAs only (no ZipLoRA); and a folder
    of such shards never mixes with the protocol's (its shards would count as finished there)."""
    assert fidelity.shard_rows(["direct", "zipq"]) == ["subject_only", "style_only", "direct", "zipq", "direct_file",
                                                       "zipq_file"]
    assert fidelity.shard_rows(fidelity.MERGES + fidelity.LIVE) == fidelity.ROWS
    trained, merged = [], []
    monkeypatch.setattr(fidelity, "train_concept_adapter",
                        lambda base, kind, folder, out, **settings: trained.append(out.name) or out)
    monkeypatch.setattr(fidelity, "merge", lambda base, method, dirs, seed, args, out: merged.append(method) or {})
    monkeypatch.setattr(fidelity, "row_adapters", lambda base, row, dirs, m: (row, 1, None))
    monkeypatch.setattr(fidelity, "sample", lambda base, groups, seed, images, adapters, candidates, schedule=None:
                        np.zeros((images, 64, 64, 3), np.uint8))

    class Args:
        images, steps, style_steps, lr, lr_schedule, methods = 2, 4, 2, 1e-3, "constant", ["direct", "zipq"]

    fidelity.check_methods(tmp_path, Args.methods)
    meta = json.loads(fidelity.run_shard(None, 0, 0, Args, tmp_path).read_text())
    assert meta["rows"] == fidelity.shard_rows(Args.methods) and merged == ["direct", "zipq"]
    assert sorted(name.rsplit("_", 1)[0] for name in trained) == ["style_dora", "subject_dora"]
    fidelity.check_methods(tmp_path, ["zipq", "direct"])  # the same methods resume
    with pytest.raises(SystemExit, match="new --shards folder"):
        fidelity.check_methods(tmp_path, fidelity.MERGES + fidelity.LIVE)
    protocol = tmp_path / "protocol"
    protocol.mkdir()
    (protocol / f"{fidelity_name(0)}.json").write_text("{}")
    with pytest.raises(SystemExit, match="new --shards folder"):
        fidelity.check_methods(protocol, ["direct", "zipq"])
    fidelity.check_methods(protocol, fidelity.MERGES + fidelity.LIVE)  # the protocol's own folder resumes
    with pytest.raises(SystemExit, match="choose from"):
        fidelity.check_methods(tmp_path / "new", ["direct", "zipq_typo"])


def test_a_shards_folder_holds_one_minis_shards(fidelity, tmp_path):
    fidelity.check_mini(tmp_path, "aaaa")
    assert json.loads((tmp_path / "mini.json").read_text()) == {"fingerprint": "aaaa"}
    fidelity.check_mini(tmp_path, "aaaa")  # the same mini resumes
    with pytest.raises(SystemExit, match="another mini"):
        fidelity.check_mini(tmp_path, "bbbb")
    old = tmp_path / "old"
    old.mkdir()
    (old / f"{fidelity_name(0)}.json").write_text("{}")
    with pytest.raises(SystemExit, match="unrecorded mini"):
        fidelity.check_mini(old, "aaaa")


@pytest.mark.parametrize("argv, says", [
    (["--add", "direct"], "not one of the shard's rows"),
    (["--add", "keep", "--recipe", "balanse=relative"], "balanse"),
    (["--add", "keep", "--recipe", "balance=equal"], "balance must be one of plain, relative, geometric"),
    (["--add", "keep", "--recipe", "keep_subject=-1"], "keep_subject must be"),
])
def test_a_bad_add_or_recipe_stops_before_any_shard_trains(fidelity, tmp_path, monkeypatch, argv, says):
    monkeypatch.setattr(fidelity, "run_shards", lambda args: pytest.fail("a shard ran"))
    monkeypatch.setattr("sys.argv", ["fidelity.py", "--shards", str(tmp_path), *argv])
    with pytest.raises(SystemExit, match=says):
        fidelity.main()
