"""The studio's behaviour without a server (studio.flow, studio.sessions): uploads sorted and staged, quotas, budgets,
the whole flow as a chain of jobs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.flow import GenerateForm, MergeForm, Studio, TrainForm, example_files
from studio.sessions import Quota, sort_uploads
from zipq_core import plan
from zipq_core.errors import ZipqError
from zipq_core.jobs import JobRegistry


@pytest.fixture
def studio(mini, tmp_path):
    registry = JobRegistry(root=tmp_path / "sessions")
    yield Studio(mini, registry, budget_s=120.0, quota=Quota(session_bytes=2 * 2**20),
                 speed=plan.Speed(flops_per_second=2e10))
    registry.close()


@pytest.fixture
def two_candidates(monkeypatch):
    """The flow's generation picks each image from two candidates, not mini's eight: these tests are about the
    chain of jobs, and the default count is exercised end to end by the app's and the CLI's tests."""
    from dataclasses import replace

    from zipq_core import config

    monkeypatch.setitem(config.FAMILY_DEFAULTS, "mini", replace(config.FAMILY_DEFAULTS["mini"], candidates=2))


def images(folder: Path, n: int, size=(96, 96)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"{i}.png")
        out.append(folder / f"{i}.png")
    return out


def test_uploads_keep_images_and_their_captions_only(tmp_path):
    files = images(tmp_path, 2)
    (tmp_path / "0.txt").write_text("a caption")
    (tmp_path / "orphan.txt").write_text("x" * 100)
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    sorted_ = sort_uploads([*files, tmp_path / "0.txt", tmp_path / "orphan.txt", tmp_path / "notes.pdf"])
    assert [p.name for p in sorted_.keep] == ["0.png", "1.png", "0.txt"]
    assert [line.split(":")[0] for line in sorted_.ignored] == ["orphan.txt", "notes.pdf"]


def test_an_image_over_the_size_limit_is_not_kept(tmp_path):
    # The page's upload limit is the adapters' (up to 1 GiB): images are held to their own limit here.
    big = tmp_path / "huge.png"
    with big.open("wb") as f:
        f.truncate(21 * 2**20)
    sorted_ = sort_uploads([big, *images(tmp_path, 1)])
    assert [p.name for p in sorted_.keep] == ["0.png"]
    assert sorted_.ignored[0].startswith("huge.png: 21 MB, over the 20 MB limit per image")


def test_a_refused_upload_keeps_the_earlier_images(studio, tmp_path):
    session = studio.new_session()
    stored = studio.store_images("subject", session, images(tmp_path / "a", 3), "sks", "thing")
    assert len(stored.images.images) == 3
    kept = sorted(p.name for p in studio.paths(session).images("subject").iterdir())
    with pytest.raises(ZipqError, match="at least 3"):
        studio.store_images("subject", session, images(tmp_path / "b", 1), "sks", "thing")
    assert sorted(p.name for p in studio.paths(session).images("subject").iterdir()) == kept
    assert not any(p.name.endswith(".staging") for p in studio.paths(session).root.rglob("*"))


def test_the_session_quota_refuses_with_what_to_do(studio, tmp_path):
    session = studio.new_session()
    big = images(tmp_path / "big", 3, size=(1200, 1200))
    noise = Image.effect_noise((1200, 1200), 100).convert("RGB")  # incompressible: ~1.4 MB a PNG
    for p in big:
        noise.save(p)
    with pytest.raises(ZipqError, match="limit is 2 MB.*New session"):
        studio.store_images("subject", session, big, "sks", "thing")


def test_requests_over_the_budget_name_what_to_lower(studio):
    session = studio.new_session()
    studio.load_examples(session, "heart", "zigzag")
    with pytest.raises(ZipqError, match="limit per job: lower the steps"):
        studio.submit_training(session, TrainForm(which="subject", steps=100_000, resolution=64))
    form = GenerateForm.parse("a heart", "", 0, 200, 5.0, 2048, 2048, 16, 1, 1, 1, 0.5, 1)
    with pytest.raises(ZipqError, match="fewer or smaller images"):
        studio.submit_generate(session, form)
    assert studio.registry.jobs_for(session) == []


def test_the_whole_flow_is_a_chain_of_jobs_with_estimates(studio, two_candidates):
    session = studio.new_session()
    loaded, jobs, prompt = studio.run_flow(session, "moon", "grid", 3, 3, "direct", 2, "", 1)
    assert loaded is not None and prompt == "a photo of sks moon in zkz style"
    assert [j.kind for j in jobs] == ["train-subject", "train-style", "merge", "generate"]
    assert jobs[1].after == (jobs[0].id,) and jobs[2].after == (jobs[0].id, jobs[1].id)
    assert jobs[3].after == (jobs[2].id,)
    assert all(0 < j.estimate_s < math.inf and j.budget_s == 120.0 for j in jobs)
    assert studio.paths(session).read_settings().flow_jobs == tuple(j.id for j in jobs)
    with pytest.raises(ZipqError, match="already has jobs"):
        studio.run_flow(session, "moon", "grid", 3, 3, "direct", 2, "", 1)
    for job in jobs:
        studio.registry.wait(job.id, 120)
    assert [j.status for j in jobs] == ["done"] * 4, [j.error for j in jobs]
    assert len([k for k in jobs[-1].artifacts if k.startswith("image")]) == 4
    assert jobs[-1].meta["note"].endswith("each image the best of 2 candidates")
    # A finished training keeps no checkpoints (they are for resuming only).
    assert not (studio.paths(session).adapter("subject") / "checkpoints").exists()
    assert studio.resumable_step(session, "subject") is None
    with pytest.raises(ZipqError, match="Nothing to resume"):
        studio.resume(session, "subject")


def test_the_merge_forms_keep_subject_reaches_the_merge():
    assert MergeForm.parse("zipq", 0.01, 10, 1, 1, 0.5, 3).config("mini").keep_subject == 3.0
    assert MergeForm().config("mini").keep_subject == 0.0  # ZipLoRA's own loss unless asked
    with pytest.raises(ZipqError, match="keep_subject must be a number from 0 to 10"):
        MergeForm.parse("zipq", 0.01, 10, 1, 1, 0.5, 11).config("mini")


def test_merge_form_refuses_non_finite_values():
    with pytest.raises(ZipqError, match="finite"):
        MergeForm.parse("zipq", float("nan"), 10, 1, 1, 0.5, 0)
    from zipq_core.config import MergeConfig

    for lam in (float("inf"), float("nan")):  # the core refuses them too (NaN passes every `<` check)
        with pytest.raises(ZipqError, match="λ must be a finite number"):
            MergeConfig(lam=lam)


def test_examples_ship_images_and_captions():
    files = example_files("subjects", "heart")
    assert any(f.suffix == ".png" for f in files) and any(f.suffix == ".txt" for f in files)


def test_a_job_that_cannot_fit_the_gpu_is_refused_before_it_queues(studio, monkeypatch):
    session = studio.new_session()
    studio.load_examples(session, "heart", "zigzag")
    monkeypatch.setattr(plan, "device_memory_gb", lambda device: 0.02)  # a 20 MB "GPU"
    with pytest.raises(ZipqError, match="more than this GPU has: lower the resolution or the rank"):
        studio.submit_training(session, TrainForm(which="subject", steps=20, resolution=64))
    with pytest.raises(ZipqError, match="more than this GPU has: generate fewer images at once"):
        studio.submit_generate(session, GenerateForm.parse("a heart", "", 0, 4, 5.0, 64, 64, 1, 1, 1))
    assert studio.registry.jobs_for(session) == []


def test_a_job_that_runs_out_of_memory_fails_with_advice_and_the_next_one_runs(studio, monkeypatch):
    import torch

    import zipq_core.train.loop as loop

    def full_gpu(*args, **kwargs):  # the UNet's forward pass, failing as it does on a full GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    session = studio.new_session()
    studio.load_examples(session, "heart", "zigzag")
    monkeypatch.setattr(loop, "unet_forward", full_gpu)
    failed = studio.submit_training(session, TrainForm(which="subject", steps=4, resolution=64))[0]
    studio.registry.wait(failed.id, 60)
    assert failed.status == "failed"
    assert failed.error.startswith("The GPU ran out of memory: lower the resolution, the rank or the batch")
    monkeypatch.undo()
    again = studio.submit_training(session, TrainForm(which="subject", steps=4, resolution=64))[0]
    studio.registry.wait(again.id, 120)
    assert again.status == "done", again.error


def test_klora_is_a_merge_without_a_file_that_generation_uses_until_the_next_merge(mini, tmp_path, two_candidates):
    """Choosing K-LoRA records the choice (a short job, no merged file); generation then runs K-LoRA on the two
    adapters; a later merge with a file takes over again."""
    registry = JobRegistry(root=tmp_path / "sessions")
    studio = Studio(mini, registry, budget_s=120.0, speed=plan.Speed(flops_per_second=2e10))
    session = studio.new_session()
    loaded, jobs, _ = studio.run_flow(session, "moon", "grid", 3, 3, "klora", 2, "", 1)
    for job in jobs:
        studio.registry.wait(job.id, 120)
    assert [j.status for j in jobs] == ["done"] * 4, [j.error for j in jobs]
    paths = studio.paths(session)
    assert studio.uses_klora(paths) and not paths.has_adapter("merged")
    assert "K-LoRA" in " ".join(jobs[-1].log) and "K-LoRA" in " ".join(jobs[2].log)
    assert len([k for k in jobs[-1].artifacts if k.startswith("image")]) == 4
    compare = studio.submit_compare(session, "a photo of sks moon in zkz style", 0, 3, 1)
    studio.registry.wait(compare.id, 120)
    assert compare.status == "done", compare.error
    assert compare.meta["variants"] == ["base", "subject only", "style only", "direct merge", "K-LoRA"]
    shown = {k: np.asarray(Image.open(paths.root / p)) for k, p in compare.artifacts.items()}
    assert not np.array_equal(shown["cmp4-0"], shown["cmp3-0"])  # K-LoRA's choice of layers is not the sum
    merge = studio.submit_merge(session, MergeForm(method="direct"))
    studio.registry.wait(merge.id, 120)
    assert merge.status == "done" and paths.has_adapter("merged") and not studio.uses_klora(paths)
    registry.close()
