"""A format choice on every adapter download: the studio's own file, or a file one tool reads exactly (exported on
first use: inline on mini, as a job on a larger base); K-LoRA, which has no merged file, says so instead."""

from __future__ import annotations

import pytest

from studio.bases import Bases
from studio.flow import NATIVE_FORMAT, Studio, download_formats
from studio.handlers import KLORA_LABEL, Handlers
from zipq_core import plan
from zipq_core.adapters import fuse_weight, save_adapter
from zipq_core.adapters.imports import import_adapter
from zipq_core.errors import ZipqError
from zipq_core.jobs import JobRegistry

from helpers import adapter_for


@pytest.fixture
def studio(mini, tiny_sd1_dir, tmp_path):
    registry = JobRegistry(root=tmp_path / "sessions")
    bases = Bases(["mini", str(tiny_sd1_dir)], device="cpu")
    bases.loaded["mini"] = mini
    yield Studio(bases, registry, budget_s=600.0, speed=plan.Speed(flops_per_second=2e10))
    registry.close()


def with_subject(studio: Studio, session: str, dora: bool = True, seed: int = 0):
    """A subject adapter made on the session's base, saved where a training would leave it."""
    base = studio.base_for(session)
    adapter = adapter_for(base.unet, dora=dora, seed=seed)
    adapter.info["base"] = base.spec
    save_adapter(adapter, studio.paths(session).adapter("subject"))
    return adapter, base


def max_relative_error(got, want, base) -> float:
    """‖W_got − W_want‖ / ‖W_want − W0‖, worst layer (issue 18's bound)."""
    modules = dict(base.unet.named_modules())
    worst = 0.0
    for key, layer in want.layers.items():
        w0 = modules[key.removeprefix("unet.")].weight.float()
        target = fuse_weight(w0, [(layer, 1.0)])
        worst = max(worst, float((fuse_weight(w0, [(got.layers[key], 1.0)]) - target).norm() / (target - w0).norm()))
    return worst


def test_formats_on_mini_export_inline_and_read_back_as_made(studio, mini):
    assert {"comfyui", "a1111", "diffusers", "kohya", "lycoris", "int8"} <= set(download_formats())
    session = studio.new_session()
    adapter, base = with_subject(studio, session)
    native = studio.download(session, "subject", NATIVE_FORMAT)
    assert native == studio.paths(session).adapter("subject") / "pytorch_lora_weights.safetensors"
    made = {}
    for fmt in ("lycoris", "diffusers", "int8"):
        path = made[fmt] = studio.download(session, "subject", fmt)
        assert path.exists() and path.is_relative_to(studio.paths(session).root / "exports"), fmt
        assert max_relative_error(import_adapter(path, base=mini), adapter, mini) <= 0.01, fmt
        assert studio.download(session, "subject", fmt) == path  # exported once per adapter
    assert studio.registry.jobs_for(session) == []  # mini: no job
    with pytest.raises(ZipqError, match="Unknown download format"):
        studio.download(session, "subject", "../../etc/passwd")
    # A new adapter is exported afresh (the export is named by the adapter's weights).
    newer, _ = with_subject(studio, session, seed=9)
    again = studio.download(session, "subject", "lycoris")
    assert again != made["lycoris"] and max_relative_error(import_adapter(again, base=mini), newer, mini) <= 0.01


def test_on_a_larger_base_an_export_is_a_job(studio, tiny_sd1_dir):
    session = studio.new_session()
    studio.registry.wait(studio.choose_base(session, tiny_sd1_dir.name).id, 120)
    adapter, base = with_subject(studio, session, dora=True, seed=3)
    line = studio.download(session, "subject", "comfyui")
    assert isinstance(line, str) and "Exporting the subject adapter for comfyui" in line
    (job,) = studio.registry.jobs_for(session, "export-subject")
    assert job.meta["base"] == base.spec and job.estimate_s > 0 and job.budget_s == 600.0
    assert "Exporting" in studio.download(session, "subject", "comfyui")  # no second job while it runs
    studio.registry.wait(job.id, 120)
    assert job.status == "done", job.error
    assert job.latest.step == job.latest.total == 1 and any("Exported for comfyui" in x for x in job.log)
    path = studio.download(session, "subject", "comfyui")
    assert path.exists() and len(studio.registry.jobs_for(session, "export-subject")) == 1


def test_the_page_buttons_follow_the_format_and_klora_says_it_has_no_file(studio):
    h = Handlers(studio)
    session = studio.new_session()
    with_subject(studio, session)
    subject_dl, style_dl = h.train_format(session, "kohya")
    assert subject_dl.interactive and subject_dl.value["path"].endswith("zipq-subject-sks-kohya.safetensors")
    assert not style_dl.interactive  # no style adapter yet
    assert studio.paths(session).read_settings().formats == {"train": "kohya"}
    polled = h.poll(session, None, "zipq")
    assert polled[4].value["path"].endswith("-kohya.safetensors")  # the poll keeps the choice
    subject_dl, _ = h.train_format(session, NATIVE_FORMAT)
    assert subject_dl.value["path"].endswith("zipq-subject-sks.safetensors")
    with pytest.raises(Exception, match="Unknown download format"):
        h.train_format(session, "pickle")
    button, note = h.merge_method_note(session, "klora")
    assert not button.interactive and button.label == KLORA_LABEL and "no merged file" in note
    assert h.poll(session, None, "klora")[8].label == KLORA_LABEL
