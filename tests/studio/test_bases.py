"""Several base models in one studio (studio.bases, `--bases`): a session per base, defaults that follow the choice,
names outside the operator's list refused, adapters never used across bases, and eviction that spares a base under
a job."""

from __future__ import annotations

import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from studio.bases import Bases, display_name, parse_bases
from studio.flow import LOAD_KIND, GenerateForm, Studio, TrainForm
from studio.handlers import BASE_FIELDS, POLL_OUTPUTS, Handlers
from studio.page import BASE_TARGETS, POLL_TARGETS
from zipq_core import plan
from zipq_core.adapters import Adapter, LoraLayer, save_adapter
from zipq_core.config import LR_SCHEDULES, TARGET_PRESETS, family_defaults
from zipq_core.errors import ZipqError
from zipq_core.jobs import JobRegistry


@pytest.fixture
def two(mini, tiny_sd1_dir, tmp_path):
    """A studio offering mini (the default) and a tiny SD1.5 pipeline."""
    registry = JobRegistry(root=tmp_path / "sessions")
    bases = Bases(["mini", str(tiny_sd1_dir)], device="cpu")
    bases.loaded["mini"] = mini
    yield Studio(bases, registry, budget_s=600.0, speed=plan.Speed(flops_per_second=2e10))
    registry.close()


def one_layer_adapter(base, spec: str) -> Adapter:
    """A tiny DoRA on the first attention projection of `base`'s UNet, saying it was made on `spec`."""
    key = next(n for n, m in base.unet.named_modules() if n.endswith("attn1.to_q"))
    weight = dict(base.unet.named_modules())[key].weight
    g = torch.Generator().manual_seed(0)
    layer = LoraLayer(down=torch.randn(2, weight.shape[1], generator=g) * 0.1,
                      up=torch.randn(weight.shape[0], 2, generator=g) * 0.1, scale=1.0,
                      magnitude=weight.float().norm(dim=1))
    return Adapter({f"unet.{key}": layer}, use_dora=True, info={"base": spec, "kind": "subject", "token": "sks"})


def test_the_operator_list_parses_and_shows_no_server_folders(tiny_sd1_dir):
    assert parse_bases(" mini, a/b ,,mini") == ["mini", "a/b"]
    with pytest.raises(ZipqError, match="at least one base"):
        parse_bases(" , ")
    assert display_name(str(tiny_sd1_dir)) == tiny_sd1_dir.name and display_name("org/model") == "org/model"
    bases = Bases(["mini", str(tiny_sd1_dir), "org/model"])
    assert bases.choices() == ["mini", tiny_sd1_dir.name, "org/model"] and bases.default == "mini"
    assert bases.spec(tiny_sd1_dir.name) == str(tiny_sd1_dir) and bases.spec("") == "mini"
    for forged in (str(tiny_sd1_dir), "/etc/passwd", "../x", "stabilityai/sdxl-turbo"):
        with pytest.raises(ZipqError, match="not offered here"):
            bases.spec(forged)


def test_a_session_per_base_with_the_family_defaults(two, tiny_sd1_dir):
    a, b = two.new_session(), two.new_session()
    name = tiny_sd1_dir.name
    assert two.choose_base(a, "mini") is None  # loaded already: nothing to wait for
    job = two.choose_base(b, name)
    assert job is not None and job.kind == LOAD_KIND and job.meta["base"] == str(tiny_sd1_dir)
    two.registry.wait(job.id, 120)
    assert job.status == "done", job.error
    assert any("Loaded" in line for line in job.log)
    assert (two.base_for(a).family, two.base_for(b).family) == ("mini", "sd1")
    assert two.paths(b).read_settings().base == name  # kept with the session's files
    sd1, mini = family_defaults("sd1"), family_defaults("mini")
    cfg_a = two.train_config("subject", two.paths(a).read_settings(), TrainForm(), two.base_for(a))
    cfg_b = two.train_config("subject", two.paths(b).read_settings(), TrainForm(), two.base_for(b))
    assert cfg_a.gradient_checkpointing == mini.gradient_checkpointing
    assert cfg_b.gradient_checkpointing == sd1.gradient_checkpointing != mini.gradient_checkpointing
    # The family's whole recipe, not only its checkpointing: what its memory and speed benchmarks measured.
    for cfg, d in ((cfg_a, mini), (cfg_b, sd1)):
        assert (cfg.target_modules, cfg.batch_size, cfg.aspect_buckets, cfg.lr_schedule) == \
            (TARGET_PRESETS[d.targets], d.batch_size, d.aspect_buckets, d.lr_schedule)
    assert cfg_b.target_modules != cfg_a.target_modules and cfg_b.batch_size != cfg_a.batch_size
    # The page's fields follow the choice: steps, rank, learning rate and sizes of the session's base family.
    h = Handlers(two)
    fields = h.choose_base(b, name)
    assert fields[0] == name and "sd1" in fields[1] and str(tiny_sd1_dir.parent) not in fields[1]
    assert fields[2:8] == (sd1.steps, sd1.steps, sd1.rank, sd1.learning_rate, sd1.lr_schedule,
                           two.base_for(b).default_size)
    assert h.choose_base(a, "mini")[2:8] == (mini.steps, mini.steps_for("style"), mini.rank, mini.learning_rate,
                                             mini.lr_schedule, 64)
    # the field counts the handlers return are the page's (a mismatch is an error on every poll in the browser)
    assert len(fields) == BASE_FIELDS + 1 and BASE_FIELDS == len(BASE_TARGETS)  # + the subject noun's choices
    assert len(h.poll(b, None)) == POLL_OUTPUTS == len(POLL_TARGETS)
    with pytest.raises(Exception, match="not offered here"):  # a forged value through the handler
        h.choose_base(a, str(tiny_sd1_dir))
    assert two.paths(a).read_settings().base == "mini"


def test_an_adapter_of_one_base_is_refused_on_another(two, tiny_sd1_dir):
    session = two.new_session()
    paths = two.paths(session)
    save_adapter(one_layer_adapter(two.base, "mini"), paths.adapter("subject"))
    form = GenerateForm.parse("a photo of sks", "", 0, 2, 5.0, 64, 64, 1, 1.0, 1.0)
    job = two.submit_generate(session, form)  # fine on the base it was made on
    two.registry.wait(job.id, 120)
    assert job.status == "done", job.error
    two.registry.wait(two.choose_base(session, tiny_sd1_dir.name).id, 120)
    with pytest.raises(ZipqError, match=f"made on the base model mini; this session now uses {tiny_sd1_dir.name}"):
        two.submit_generate(session, form)
    with pytest.raises(ZipqError, match="made on the base model mini"):
        two.compare_variants(paths, two.base_for(session))
    # Switching is refused while the session has a job on its base.
    two.choose_base(session, "mini")
    gen = two.submit_generate(session, GenerateForm.parse("a photo of sks", "", 0, 50, 5.0, 64, 64, 4, 1.0, 1.0))
    with pytest.raises(ZipqError, match="jobs queued or running on its base model"):
        two.choose_base(session, tiny_sd1_dir.name)
    two.cancel(session)
    two.registry.wait(gen.id, 60)


def fake_loader(loads: list):
    def load(spec: str, device=None):
        loads.append(spec)
        return SimpleNamespace(spec=spec, arch="sd1", lock=threading.RLock())
    return load


def test_eviction_spares_a_base_under_a_job():
    loads: list[str] = []
    bases = Bases(["a/one", "a/two", "a/three"], max_loaded=2, loader=fake_loader(loads))
    busy: set[str] = set()
    first = bases.load("a/one", lambda s: s in busy)
    bases.load("a/two", lambda s: s in busy)
    assert bases.load("a/one", lambda s: s in busy) is first and loads == ["a/one", "a/two"]  # cached
    busy.update({"a/one", "a/two"})
    with pytest.raises(ZipqError, match="each needed by a queued or running job"):
        bases.load("a/three", lambda s: s in busy)
    assert list(bases.loaded) == ["a/two", "a/one"]  # nothing unloaded
    busy.discard("a/two")  # a/one was used last, but a/two is the one no job needs
    lines: list[str] = []
    bases.load("a/three", lambda s: s in busy, lines.append)
    assert list(bases.loaded) == ["a/one", "a/three"] and any("Unloaded a/two" in x for x in lines)
    with pytest.raises(ZipqError, match="not offered"):
        bases.load("a/other", lambda s: False)


def test_the_studio_counts_queued_jobs_and_held_locks_as_use(two):
    session = two.new_session()
    assert not two.in_use("mini")
    with two.base.lock:  # a stage holding the base in another thread
        held = []
        t = threading.Thread(target=lambda: held.append(two.in_use("mini")))
        t.start()
        t.join()
    assert held == [True]
    save_adapter(one_layer_adapter(two.base, "mini"), two.paths(session).adapter("subject"))
    gen = two.submit_generate(session, GenerateForm.parse("a photo of sks", "", 0, 50, 5.0, 64, 64, 4, 1.0, 1.0))
    assert two.in_use("mini")
    two.cancel(session)
    two.registry.wait(gen.id, 60)
    assert not two.in_use("mini")


def test_a_hub_download_checks_the_disk_first_and_shows_its_progress(tmp_path, monkeypatch):
    import studio.flow as flow
    import zipq_core.base as core
    from studio.bases import download_plan

    monkeypatch.setattr(core, "is_offline", lambda: False)
    monkeypatch.setattr(flow.plan, "measure_speed", lambda base: plan.Speed(2e10))
    monkeypatch.setattr(core, "download_size", lambda repo, variant: 50 * 10**9)

    def no_room(repo, nbytes):
        raise ZipqError(f"Downloading {repo} needs {nbytes / 1e9:.1f} GB but only 1.0 GB is free")

    monkeypatch.setattr(core, "check_free_disk", no_room)
    monkeypatch.setattr("studio.bases.is_offline", lambda: False)
    monkeypatch.setattr("studio.bases.hub_cache_folder", lambda repo: tmp_path / "empty-cache")
    with pytest.raises(ZipqError, match="needs 50.0 GB"):  # refused before a byte is fetched
        download_plan("org/huge")

    # The load job: a line per MB fetched so far (the cache folder watched), then "Loaded".
    cache = tmp_path / "models--org--model"
    monkeypatch.setattr(flow, "download_plan", lambda spec: 3 * 2**20)
    monkeypatch.setattr(flow, "hub_cache_folder", lambda spec: cache)

    def slow_download(spec, device=None):
        cache.mkdir()
        (cache / "unet.safetensors").write_bytes(b"\0" * 2 * 2**20)
        threading.Event().wait(2.5)
        return SimpleNamespace(spec=spec, arch="sdxl", lock=threading.RLock())

    registry = JobRegistry(root=tmp_path / "sessions")
    try:
        studio = Studio(Bases(["mini", "org/model"], loader=slow_download), registry, speed=plan.Speed(2e10))
        session = studio.new_session()
        job = studio.choose_base(session, "org/model")
        registry.wait(job.id, 60)
        assert job.status == "done", job.error
        assert job.log[0].startswith("Downloading org/model: 0.0 GB") and job.log[-1].startswith("Loaded org/model")
        assert any((p.step, p.total) == (2, 3) for p in job.progress)  # 2 of 3 MB, as the page's job line shows
        assert studio.bases.resident("org/model") is not None
    finally:
        registry.close()


def test_the_upload_limit_follows_the_bases_offered():
    """Gradio has one upload limit for every file: a Space offering mini alone keeps it small (its adapters are a few
    MB); a real base raises it to what SDXL LoRAs weigh; the operator's --max-adapter-mb wins."""
    from studio.launch import MINI_ADAPTER_MB, adapter_limit_mb, parse_args
    from zipq_core.adapters.imports import MAX_ADAPTER_BYTES

    assert adapter_limit_mb(parse_args(["--base", "mini"])) == MINI_ADAPTER_MB
    assert adapter_limit_mb(parse_args(["--bases", "mini,org/sdxl"])) == MAX_ADAPTER_BYTES / 2**20
    assert adapter_limit_mb(parse_args(["--bases", "mini", "--max-adapter-mb", "300"])) == 300


def test_each_kind_trains_its_own_steps_with_previews_spread_over_them(two):
    session = two.new_session()
    settings = two.paths(session).read_settings()
    form = TrainForm(steps=40, style_steps=10, previews=4)
    subject, style = (two.train_config(kind, settings, form) for kind in ("subject", "style"))
    assert (subject.steps, subject.sample_every, style.steps, style.sample_every) == (40, 10, 10, 2)
    assert two.train_config("style", settings, replace(form, style_steps=None)).steps == 40  # none: the subject's
    assert two.train_config("subject", settings, replace(form, previews=0)).sample_every == 0
    assert two.train_config("style", settings, replace(form, previews=50)).sample_every == 1  # at most one a step
    with pytest.raises(ZipqError, match="Previews must be 0"):
        two.train_config("subject", settings, replace(form, previews=-1))
    # the schedule: the family's unless the form names one
    family = family_defaults("mini").lr_schedule
    assert two.train_config("subject", settings, form).lr_schedule == family
    other = next(s for s in LR_SCHEDULES if s != family)
    assert two.train_config("style", settings, replace(form, lr_schedule=other)).lr_schedule == other
    with pytest.raises(ZipqError, match="schedule"):
        two.train_config("subject", settings, replace(form, lr_schedule="linear"))
