"""What a visitor does, as calls into the core and jobs in the registry: uploads, training, merging, generating,
comparing, and the whole flow chained. No gradio here: the page's handlers (studio.handlers) turn form values into
the forms below and this module's errors into messages; tests drive it without a server.

Every heavy request is a job with an estimate from zipq_core.plan, refused when the estimate exceeds the server's
per-job budget (the message names what to lower) and stopped by the registry's watchdog if it overruns.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from zipq_core import plan
from zipq_core.adapters import (
    INT8_DIR,
    INT8_WEIGHTS_NAME,
    WEIGHTS_NAME,
    Adapter,
    load_adapter,
    load_training_views,
    resolve_module,
    save_adapter,
)
from zipq_core.base import BaseModel
from zipq_core.config import (
    METHODS,
    DataConfig,
    GenerateConfig,
    KLoraConfig,
    MergeConfig,
    Sliders,
    TrainConfig,
    check_fraction,
    check_strength,
    family_defaults,
    kind_steps,
)
from zipq_core.data import ImageSet, prepare_images
from zipq_core.errors import ZipqError
from zipq_core.generation import AdapterSpec, detail_spec, generate
from zipq_core.jobs import FINISHED, Job, JobContext, JobRegistry, inside
from zipq_core.merge import klora_plan, merge_adapters, slider_adapters
from zipq_core.train import checkpoint_config, latest_checkpoint, train_adapter
from zipq_core.train.checkpoints import checkpoint_step

from . import sessions
from .bases import Bases, download_plan, hub_cache_folder, is_hub_id, watch_download
from .sessions import STYLE_TOKEN, SUBJECT_TOKEN, Quota, SessionPaths, Settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
DEFAULT_SUBJECT_EXAMPLE, DEFAULT_STYLE_EXAMPLE = "heart", "zigzag"
LIMITS = {"subject": (3, 10), "style": (1, 5)}  # images per concept
MAX_UPLOAD_FILES = 40  # images and their caption files in one upload
MAX_ADAPTER_BYTES = 1 << 30  # one imported adapter file: real SDXL LoRAs are 50–900 MB
NATIVE_FORMAT = "studio"  # the adapter file as the studio writes it (diffusers layout, our metadata)
KLORA_NO_DOWNLOAD = ("K-LoRA has no merged file: it picks each layer's adapter anew at every denoising step. Download "
                     "the subject and the style adapters and use both.")
LOAD_KIND = "load-base"  # the job that loads (or downloads) a session's base model
MERGE_LABELS = {"zipq": "ZipQDoRA", "zip": "ZipLoRA", "direct": "direct (weighted sum)", "ties": "TIES",
                "dare": "DARE", "blora": "B-LoRA", "klora": "K-LoRA (at generation; no merged file)"}


def number(value: object, name: str, kind: type = float):
    """A form field's number, or a message naming the field (an emptied number box sends None)."""
    try:
        result = kind(float(value))
    except (TypeError, ValueError, OverflowError):
        raise ZipqError(f"{name} needs a number (the field is empty or not a number).") from None
    if isinstance(result, float) and not math.isfinite(result):
        raise ZipqError(f"{name} needs a finite number.")
    return result


# --------------------------------------------------------------------------------------------------- forms
@dataclass(frozen=True)
class TrainForm:
    """The Train tab's fields."""

    which: str = "both"
    method: str = "dora"
    quantize: str = "none"
    int8: bool = False
    rank: int = 8
    steps: int = 300
    style_steps: int | None = None  # None: `steps`
    learning_rate: float = 3e-3
    lr_schedule: str | None = None  # None: the base family's
    resolution: int = 64
    prior: bool = False
    previews: int = 6  # per training, evenly spaced (0: none)

    @classmethod
    def parse(cls, which, method, quantize, int8, rank, steps, style_steps, lr, lr_schedule, resolution, prior,
              previews) -> TrainForm:
        if which not in ("subject", "style", "both"):
            raise ZipqError("Train 'subject', 'style' or 'both'.")
        return cls(which=which, method=method, quantize=quantize, int8=bool(int8), rank=number(rank, "Rank", int),
                   steps=number(steps, "Subject steps", int), style_steps=number(style_steps, "Style steps", int),
                   learning_rate=number(lr, "Learning rate"), lr_schedule=lr_schedule or None,
                   resolution=number(resolution, "Resolution", int), prior=bool(prior),
                   previews=number(previews, "Previews", int))

    @property
    def kinds(self) -> list[str]:
        return ["subject", "style"] if self.which == "both" else [self.which]

    def steps_for(self, kind: str) -> int:
        return kind_steps(kind, self.steps, self.style_steps)

    def sample_every(self, kind: str) -> int:
        """The preview interval that spreads `previews` over this kind's steps (0: no previews)."""
        if self.previews < 0:
            raise ZipqError(f"Previews must be 0 (none) or more, not {self.previews}.")
        return max(1, self.steps_for(kind) // self.previews) if self.previews else 0


@dataclass(frozen=True)
class MergeForm:
    """The Merge tab's fields."""

    method: str = "zipq"
    lam: float = 0.01
    steps: int = 100
    subject_weight: float = 1.0
    style_weight: float = 1.0
    density: float = 0.5
    keep_subject: float = 0.0

    @classmethod
    def parse(cls, method, lam, steps, subject_weight, style_weight, density, keep_subject) -> MergeForm:
        return cls(method=method, lam=number(lam, "λ"), steps=number(steps, "Steps", int),
                   subject_weight=number(subject_weight, "Subject weight"),
                   style_weight=number(style_weight, "Style weight"), density=number(density, "Density"),
                   keep_subject=number(keep_subject, "Keep subject"))

    def config(self, family: str) -> MergeConfig:
        return MergeConfig.for_family(family, method=self.method, steps=self.steps, lam=self.lam,
                                      subject_weight=self.subject_weight, style_weight=self.style_weight,
                                      density=self.density, keep_subject=self.keep_subject)


@dataclass(frozen=True)
class GenerateForm:
    """The Generate tab's fields: the request and the merge's sliders."""

    request: GenerateConfig
    sliders: Sliders

    @classmethod
    def parse(cls, prompt, negative, seed, steps, guidance, width, height, num_images, subject_strength,
              style_strength, subject_detail=Sliders.subject_detail, handoff=GenerateConfig.handoff,
              candidates=1) -> GenerateForm:
        request = GenerateConfig(prompt=prompt or "", negative_prompt=negative or "", seed=number(seed, "Seed", int),
                                 steps=number(steps, "Steps", int), guidance=number(guidance, "Guidance"),
                                 width=number(width, "Width", int), height=number(height, "Height", int),
                                 num_images=number(num_images, "Images", int), handoff=number(handoff, "Hand-off"),
                                 candidates=number(candidates, "Candidates per image", int))
        sliders = Sliders(subject=check_strength(number(subject_strength, "Subject strength")),
                          style=check_strength(number(style_strength, "Style strength")),
                          subject_detail=check_fraction(number(subject_detail, "Subject in fine detail"),
                                                        "subject in fine detail"))
        return cls(request, sliders)


# ------------------------------------------------------------------------------------------------- studio
@dataclass
class Stored:
    """The outcome of an upload: the accepted views, what was not kept, the session's words now."""

    images: ImageSet
    ignored: list[str]
    settings: Settings
    guess: str | None = None


class Studio:
    """The app's behaviour over the operator's base models and one job registry.

    Each session works on one base of the operator's list (its choice is kept in its settings); every job names the
    base it needs (`meta["base"]`), so a base under a queued or running job is never unloaded (studio.bases).

    Args:
        base: the loaded base model of a one-base studio, or the operator's `Bases` (the first is the default).
        registry: sessions and jobs.
        budget_s: device-seconds one job may cost (estimates above it are refused, overruns stopped).
        quota: disk per session and in all.
        speed: this device's measured throughput (measured per base on first use when None).
        max_adapter_bytes: the largest adapter file a visitor may import ("Use an existing LoRA").
    """

    def __init__(self, base: BaseModel | Bases, registry: JobRegistry, budget_s: float = math.inf,
                 quota: Quota | None = None, speed: plan.Speed | None = None,
                 max_adapter_bytes: int = MAX_ADAPTER_BYTES):
        self.bases = base if isinstance(base, Bases) else Bases.of(base, speed)
        if speed is not None:
            self.bases.speed = speed
        self.registry = registry
        self.budget_s = budget_s
        self.quota = quota or Quota()
        self.max_adapter_bytes = max_adapter_bytes

    @property
    def base(self) -> BaseModel:
        """The default base (the first of the operator's list), loaded when first asked for."""
        spec = self.bases.spec(None)
        return self.bases.resident(spec) or self.bases.load(spec, self.in_use)

    @property
    def speed(self) -> plan.Speed:
        return self.bases.speed_of(self.base)

    @property
    def defaults(self):
        return family_defaults(self.base.family)

    # --------------------------------------------------------------------------------------------- bases
    def in_use(self, spec: str) -> bool:
        """Whether a queued or running job needs a base, or a stage holds it right now (its lock)."""
        # Every unfinished job of every session (the registry has no public list of the waiting ones that wait for
        # another job, and those need their base as much as the others).
        if any(j.meta.get("base") == spec and j.kind != LOAD_KIND and j.status not in FINISHED
               for j in self.registry._all()):
            return True
        base = self.bases.loaded.get(spec)
        if base is not None and base.lock.acquire(blocking=False):
            base.lock.release()
            return False
        return base is not None

    def base_name(self, session: str) -> str:
        """The session's base (its display name); a choice the server no longer offers falls back to the default."""
        name = self.paths(session).read_settings().base
        return name if name in self.bases.names else self.bases.default

    def base_for(self, session: str) -> BaseModel:
        """The session's base model, loaded; a message when it is still loading (its job's line shows progress)."""
        name = self.base_name(session)
        base = self.bases.resident(self.bases.spec(name))
        if base is not None:
            return base
        if self._busy(session, LOAD_KIND):
            raise ZipqError(f"The base model {name} is still loading: wait for it (its line shows the progress).")
        raise ZipqError(f"The base model {name} is not loaded: choose it again under 'Base model' (it loads as a "
                        "job).")

    def choose_base(self, session: str, name: str) -> Job | None:
        """Make `name` (one of the operator's list) the session's base; returns the job that loads it, or None when
        it is loaded already. The session's adapters stay, but one made on another base is refused with a message."""
        spec = self.bases.spec(name)  # refuses a name outside the list (a forged API value)
        paths = self.paths(session)
        s = paths.read_settings()
        if self.base_name(session) != name and any(j.status not in FINISHED and j.kind != LOAD_KIND
                                                   for j in self.registry.jobs_for(session)):
            raise ZipqError("This session has jobs queued or running on its base model: wait for them or cancel "
                            "them before switching.")
        paths.write_settings(replace(s, base=name))
        return None if self.bases.resident(spec) is not None else self.submit_load(session, spec)

    def submit_load(self, session: str, spec: str) -> Job:
        """Queue the load of a base (a hub download shows its progress in MB; free disk is checked first)."""
        pending = self.registry.latest(session, LOAD_KIND)
        if pending is not None and pending.status not in FINISHED and pending.meta.get("base") == spec:
            return pending
        name = self.bases.name_of(spec)
        return self.registry.submit(session, LOAD_KIND, functools.partial(self._load_job, spec),
                                    label=f"load {name}", estimate_s=120.0 if is_hub_id(spec) else 5.0,
                                    meta={"base": spec})

    def _load_job(self, spec: str, ctx: JobContext):
        total = download_plan(spec)
        stop = threading.Event()
        if total:
            ctx.log(f"Downloading {self.bases.name_of(spec)}: {total / 1e9:.1f} GB (the disk has room for it).")
            watch_download(hub_cache_folder(spec), total, ctx.progress, stop)
        try:
            base = self.bases.load(spec, self.in_use, ctx.log)
        finally:
            stop.set()
        self.bases.speed_of(base)  # measured once per base, inside the job: it takes the device
        return ()

    def check_adapter_base(self, adapter: Adapter, base: BaseModel, what: str) -> Adapter:
        """Refuse an adapter made on another base than the session's (its layers would not mean the same)."""
        made_on = adapter.info.get("base")
        if made_on and made_on != base.spec:
            other, mine = self.bases.name_of(made_on), self.bases.name_of(base.spec)
            raise ZipqError(f"The {what} adapter was made on the base model {other}; this session now uses {mine}. "
                            f"Choose {other} again under 'Base model', or train (or import) the {what} adapter on "
                            f"{mine}.")
        return adapter

    def adapter_of(self, paths: SessionPaths, kind: str, base: BaseModel) -> Adapter:
        folder = paths.merged if kind == "merged" else paths.adapter(kind)
        return self.check_adapter_base(load_adapter(folder), base, kind)

    # ------------------------------------------------------------------------------------------ sessions
    def new_session(self, address: str = "") -> str:
        self.registry.cleanup()  # a cheap moment to forget sessions past their time-to-live
        return self.registry.new_session(address)

    def paths(self, session: str) -> SessionPaths:
        return SessionPaths(self.registry.session_dir(self.registry.check(session)))

    def _check_disk(self, paths: SessionPaths, incoming_bytes: int = 0, incoming_files: int = 0) -> None:
        total = self.registry.usage()[0]
        if total + incoming_bytes > self.quota.total_bytes:
            self.registry.cleanup()
            total = self.registry.usage()[0]
        self.quota.check(sessions.usage(paths), total, incoming_bytes, incoming_files)

    # --------------------------------------------------------------------------------------------- data
    def data_config(self, kind: str, resolution: int | None = None, buckets: bool = False,
                    base: BaseModel | None = None) -> DataConfig:
        low, high = LIMITS[kind]
        return DataConfig(resolution=resolution or (base or self.base).default_size, min_images=low,
                          max_images=high, buckets=buckets)

    def _data_base(self, session: str) -> BaseModel:
        """The base that sizes the previews of uploads: the session's, or the default while the session's loads
        (training prepares the images again at its own resolution)."""
        return self.bases.resident(self.bases.spec(self.base_name(session))) or self.base

    def caption(self, kind: str, s: Settings) -> str:
        return TrainConfig(kind=kind, token=s.token(kind), class_noun=s.noun(kind)).instance_prompt

    def prepare(self, kind: str, sources, s: Settings, base: BaseModel, resolution: int | None = None) -> ImageSet:
        buckets = family_defaults(base.family).aspect_buckets
        return prepare_images(sources, self.caption(kind, s), self.data_config(kind, resolution, buckets, base),
                              token=s.token(kind))

    def store_images(self, kind: str, session: str, files: Sequence[str | Path] | None, token: str,
                     noun: str) -> Stored:
        """Check and keep a concept's uploads. A refused upload changes nothing: the earlier images stay."""
        low, high = LIMITS[kind]
        if not files:
            raise ZipqError(f"Upload {low}–{high} {kind} images first (PNG, JPEG or WebP).")
        if len(files) > MAX_UPLOAD_FILES:
            raise ZipqError(f"{len(files)} files in one upload: send at most {high} {kind} images (and their caption "
                            "files).")
        paths = self.paths(session)
        base = self._data_base(session)
        s = paths.read_settings().with_words(kind, token, noun)
        uploads = sessions.sort_uploads(files)
        self._check_disk(paths, uploads.bytes, len(uploads.keep))
        folder = paths.images(kind)
        staging = sessions.stage_uploads(uploads.keep, folder)
        try:
            image_set = self.prepare(kind, staging, s, base)
        except ZipqError:
            sessions.discard_staged(folder)
            raise
        sessions.commit_staged(staging, folder, [r.name for r in image_set.rejected])
        image_set = self.prepare(kind, folder, s, base)  # the kept files, named as stored
        guess = self.noun_guess(kind, image_set, base)
        if kind == "subject" and guess and not s.class_noun:  # an empty class noun takes the evaluator's guess
            s = s.with_words(kind, s.subject_token, guess)
        paths.write_settings(s)
        return Stored(image_set, uploads.ignored, s, guess)

    def noun_guess(self, kind: str, image_set: ImageSet, base: BaseModel) -> str | None:
        """On mini the offline evaluator names what the subject images show (a class-noun suggestion)."""
        if kind != "subject" or not base.is_mini:
            return None
        from zipq_mini.evaluator import summarize_predictions

        try:
            counts = summarize_predictions([t.image for t in image_set.images])["subject"]
        except (ZipqError, OSError, KeyError):
            return None
        return next(iter(counts), None)

    def stored_views(self, kind: str, session: str) -> ImageSet | None:
        """The session's kept images of a concept, prepared (None when there are none or they no longer pass)."""
        paths = self.paths(session)
        folder = paths.images(kind)
        if not folder.exists() or not any(folder.iterdir()):
            return None
        return self.prepare(kind, folder, paths.read_settings(), self._data_base(session))

    def remember_words(self, session: str, subject_token: str, class_noun: str, style_token: str,
                       style_noun: str) -> Settings:
        paths = self.paths(session)
        s = paths.read_settings().with_words("subject", subject_token, class_noun)
        s = s.with_words("style", style_token, style_noun)
        paths.write_settings(s)
        return s

    def load_examples(self, session: str, subject_name: str, style_name: str) -> tuple[Stored, Stored]:
        """Fill the Subject and Style tabs from `assets/examples` (tokens sks / zkz, class = folder name)."""
        subject_name = subject_name or DEFAULT_SUBJECT_EXAMPLE
        style_name = style_name or DEFAULT_STYLE_EXAMPLE
        if subject_name not in example_names("subject") or style_name not in example_names("style"):
            raise ZipqError(f"Unknown example: choose a subject from {example_names('subject')} and a style "
                            f"from {example_names('style')}.")
        sub = self.store_images("subject", session, example_files("subjects", subject_name), SUBJECT_TOKEN,
                                subject_name)
        sty = self.store_images("style", session, example_files("styles", style_name), STYLE_TOKEN, "")
        return sub, sty

    # -------------------------------------------------------------------------------------------- budgets
    def _within_budget(self, estimate: float, what: str, lower: str) -> float:
        if estimate > self.budget_s:
            raise ZipqError(f"This {what} would take about {plan.describe(estimate)} on this server, over its "
                            f"{plan.describe(self.budget_s)} limit per job: {lower}.")
        return estimate

    def _memory(self, base: BaseModel, stage: str, **settings) -> str:
        """The job's memory plan (zipq_core.plan), refused with what to lower when it cannot fit the GPU."""
        needs = plan.plan_memory(base, stage, **settings)
        plan.check_fits(needs)
        return needs.describe()

    def _busy(self, session: str, kind: str) -> bool:
        job = self.registry.latest(session, kind)
        return job is not None and job.status not in FINISHED

    # ------------------------------------------------------------------------------------------- training
    def train_config(self, kind: str, s: Settings, form: TrainForm, base: BaseModel | None = None) -> TrainConfig:
        """The base family's recipe (targets, batch, checkpointing, …: what its benchmarks measured), with the
        Train tab's fields over it."""
        return TrainConfig.for_family((base or self.base).family, kind=kind, token=s.token(kind),
                                      class_noun=s.noun(kind), method=form.method, rank=form.rank,
                                      learning_rate=form.learning_rate, lr_schedule=form.lr_schedule,
                                      steps=form.steps_for(kind), resolution=form.resolution,
                                      prior_preservation=form.prior and kind == "subject",
                                      quantize_base=form.quantize, sample_every=form.sample_every(kind),
                                      checkpoint_every=max(10, form.steps_for(kind) // 4))

    def submit_training(self, session: str, form: TrainForm) -> list[Job]:
        """Queue training of the subject, the style or both (one after the other); returns at once."""
        paths = self.paths(session)
        base = self.base_for(session)
        s = paths.read_settings()
        cfgs = [self.train_config(kind, s, form, base) for kind in form.kinds]  # validate all before starting any
        return self._submit_training(session, paths, base, cfgs, form.int8, resume=False)

    def resume(self, session: str, which: str) -> list[Job]:
        """Continue interrupted or cancelled trainings from their newest checkpoint, with the settings they began
        with (whatever the form says now)."""
        paths = self.paths(session)
        base = self.base_for(session)
        kinds = ["subject", "style"] if which == "both" else [which]
        cfgs = []
        for kind in kinds:
            ckpt = latest_checkpoint(paths.adapter(kind))
            saved = checkpoint_config(ckpt) if ckpt is not None else None
            if saved is None:
                raise ZipqError(f"Nothing to resume for the {kind}: no checkpoint yet (a finished training keeps "
                                "none). Start a training instead.")
            cfgs.append(saved)
        earlier = [self.registry.latest(session, f"train-{kind}") for kind in kinds]
        for kind, job in zip(kinds, earlier):
            if job is not None and job.meta.get("base", base.spec) != base.spec:
                other = self.bases.name_of(job.meta["base"])
                raise ZipqError(f"The {kind} training to resume ran on the base model {other}: choose {other} again "
                                "under 'Base model' to resume it, or start a new training.")
        int8 = any(j is not None and j.meta.get("int8") for j in earlier)
        return self._submit_training(session, paths, base, cfgs, int8, resume=True)

    def _submit_training(self, session: str, paths: SessionPaths, base: BaseModel, cfgs: list[TrainConfig],
                         int8: bool, resume: bool) -> list[Job]:
        estimates, memory = [], []
        for cfg in cfgs:
            if not paths.images(cfg.kind).exists():
                raise ZipqError(f"No {cfg.kind} images yet: upload them in the {cfg.kind.title()} tab (or load the "
                                "examples).")
            if self._busy(session, f"train-{cfg.kind}"):
                raise ZipqError(f"A {cfg.kind} training is already queued or running: wait for it or cancel it.")
            done = checkpoint_step(latest_checkpoint(paths.adapter(cfg.kind))) if resume else 0
            full = plan.train_seconds(base, cfg, self.bases.speed_of(base))
            estimates.append(self._within_budget(full * (cfg.steps - done) / cfg.steps, f"{cfg.kind} training",
                                                 "lower the steps, the resolution or the batch"))
            memory.append(self._memory(base, "train", train=cfg))
        self._check_disk(paths)
        # One after the other, each waiting for the one before: a session's jobs form a chain, so each of them
        # waits for at most one other session's turn (the fair order serves the least recently served session).
        jobs: list[Job] = []
        for cfg, estimate, needs in zip(cfgs, estimates, memory):
            jobs.append(self.registry.submit(session, f"train-{cfg.kind}",
                                             functools.partial(self._train_job, base, cfg, int8, resume, paths),
                                             label=f"{'resume' if resume else 'train'} {cfg.kind}",
                                             after=[jobs[-1].id] if jobs else (), estimate_s=estimate,
                                             budget_s=self.budget_s,
                                             meta={"int8": int8, "kind": cfg.kind, "memory": needs,
                                                   "base": base.spec}))
        return jobs

    def _train_job(self, base: BaseModel, cfg: TrainConfig, int8: bool, resume: bool, paths: SessionPaths,
                   ctx: JobContext):
        """The job body: prepare the stored images, run the core's trainer, optionally save an INT8 copy."""
        out = paths.adapter(cfg.kind)
        if not resume:
            shutil.rmtree(out, ignore_errors=True)  # a fresh training starts from nothing (the merge is kept)
        # The caption comes from the config made at submission, even if the tokens were edited since.
        images = prepare_images(paths.images(cfg.kind), cfg.instance_prompt,
                                self.data_config(cfg.kind, cfg.resolution, cfg.aspect_buckets, base), token=cfg.token)
        yield from train_adapter(base, images, cfg, out, resume=resume, cancel=ctx.cancel, info={"base": base.spec})
        if int8 and paths.has_adapter(cfg.kind):
            ctx.artifact("int8", save_adapter(load_adapter(out), out / INT8_DIR, storage="int8"))
            ctx.log("Saved an INT8 copy of the adapter.")

    def resumable_step(self, session: str, kind: str) -> int | None:
        """The step a resume of this concept's training would continue from (None: nothing to resume)."""
        ckpt = latest_checkpoint(self.paths(session).adapter(kind))
        return checkpoint_step(ckpt) if ckpt is not None else None

    def cancel(self, session: str, what: str = "all") -> int:
        """Cancel the session's unfinished jobs whose kind starts with `what` ('train', 'merge', 'generate', 'all')."""
        self.registry.check(session)
        prefix = "" if what == "all" else what
        jobs = [j for j in self.registry.jobs_for(session) if j.status not in FINISHED and j.kind.startswith(prefix)]
        for job in jobs:
            self.registry.cancel(job.id, "Cancelled: what was made so far is kept.")
        return len(jobs)

    # -------------------------------------------------------------------------------------- existing LoRAs
    def import_adapter(self, session: str, kind: str, files: Sequence[str | Path] | None) -> Adapter:
        """Use a visitor's own LoRA/DoRA/LoHa/LoKr file as the session's subject or style adapter (instead of
        training one): read for the session's base, then kept as our own adapter folder, so merging and generating
        read it like a trained one. A refused file changes nothing.

        Args:
            session: the visitor's session.
            kind: "subject" or "style".
            files: one .safetensors file, optionally with peft's adapter_config.json.

        Returns:
            The adapter as saved.
        """
        if kind not in ("subject", "style"):
            raise ZipqError("Use the file as the 'subject' or the 'style' adapter.")
        paths = self.paths(session)
        base = self.base_for(session)
        upload = sessions.sort_adapter_upload(files or ())
        if upload.bytes > self.max_adapter_bytes:
            raise ZipqError(f"{upload.weights.name} is {upload.bytes / 2**20:,.0f} MB; adapter files may be at most "
                            f"{self.max_adapter_bytes / 2**20:,.0f} MB on this server. Use a smaller rank (or ask "
                            "the operator to raise --max-adapter-mb).")
        if self._busy(session, f"train-{kind}") or self._busy(session, "merge"):
            raise ZipqError(f"A {kind} training or a merge is queued or running: wait for it or cancel it first.")
        self._check_disk(paths, 2 * upload.bytes, 3)  # the staged upload, then the adapter folder
        staging = paths.adapter(kind).with_name(f"{kind}.import")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            adapter = read_adapter(sessions.stage_adapter_upload(upload, staging / "upload"), base,
                                   self.max_adapter_bytes)
            check_adapter_fits(adapter, base)
            adapter.info = {**adapter.info, "base": base.spec, "kind": kind, "source": upload.weights.name,
                            "imported": adapter.info.get("imported") or "adapter file"}
            shutil.rmtree(staging / "upload")
            save_adapter(adapter, staging, dtype=base.adapter_dtype)
            out = paths.adapter(kind)
            shutil.rmtree(out, ignore_errors=True)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return adapter

    # ------------------------------------------------------------------------------------------- downloads
    def download(self, session: str, kind: str, fmt: str) -> Path | str:
        """The file a download of the session's subject, style or merged adapter in format `fmt` serves, or a line
        saying why there is none yet (an export on a large base is a job: queued, budgeted, with progress; on mini
        it runs here and now).

        Args:
            session: the visitor's session.
            kind: "subject", "style" or "merged".
            fmt: NATIVE_FORMAT (the file as the studio writes it) or a name of `download_formats()`.

        Returns:
            The path to publish, or what to tell the visitor.
        """
        paths = self.paths(session)
        folder = paths.merged if kind == "merged" else paths.adapter(kind)
        if not paths.has_adapter(kind):
            return f"No {kind} adapter yet."
        if fmt == NATIVE_FORMAT:
            return folder / WEIGHTS_NAME
        if fmt not in download_formats():
            raise ZipqError(f"Unknown download format {fmt!r}: choose one of {', '.join(download_formats())}.")
        out, served = export_target(paths, kind, fmt)
        if served.exists():
            return served
        base = self.base_for(session)
        job = self.registry.latest(session, f"export-{kind}")
        pending = job is not None and job.status not in FINISHED
        if not pending:  # exports of earlier adapters are not served again: they only take the session's disk
            for stale in out.parent.glob(f"{kind}-*"):
                if stale.name.rsplit("-", 1)[-1].partition(".")[0] != out.name.rsplit("-", 1)[-1].partition(".")[0]:
                    _remove(stale)
        if base.is_mini and not pending:  # a few small layers: faster than a queued job's round trip
            self.check_adapter_base(load_adapter(folder), base, kind)
            self._check_disk(paths)
            export_file(folder, base, fmt, out)
            return served
        if pending:
            return f"Exporting the {kind} adapter for {fmt}…"
        if job is not None and job.status == "failed" and job.meta.get("target") == out.name:
            return f"The {fmt} export failed: {job.error}"
        self.submit_export(session, kind, fmt, base)
        return f"Exporting the {kind} adapter for {fmt} (queued)…"

    def submit_export(self, session: str, kind: str, fmt: str, base: BaseModel) -> Job:
        paths = self.paths(session)
        folder = paths.merged if kind == "merged" else paths.adapter(kind)
        adapter = self.check_adapter_base(load_adapter(folder), base, kind)
        # An export reads each adapted layer's base weight once and fuses it: about one UNet forward's work.
        estimate = self._within_budget(plan.unet_flops(base, base.default_size, base.default_size) /
                                       self.bases.speed_of(base).flops_per_second * max(1, len(adapter.layers) / 100),
                                       "export", "export a smaller adapter")
        self._check_disk(paths)
        out, _ = export_target(paths, kind, fmt)
        return self.registry.submit(session, f"export-{kind}", functools.partial(self._export_job, base, folder, fmt,
                                                                                 out),
                                    label=f"export {kind} ({fmt})", estimate_s=estimate, budget_s=self.budget_s,
                                    meta={"base": base.spec, "format": fmt, "target": out.name})

    def _export_job(self, base: BaseModel, folder: Path, fmt: str, out: Path, ctx: JobContext):
        ctx.progress(0, 1)
        report = export_file(folder, base, fmt, out)
        ctx.progress(1, 1)
        if report is not None:
            ctx.log(f"Exported for {fmt}: {report.bytes / 1e6:.1f} MB, worst layer within "
                    f"{100 * report.max_relative_error:.2f} % of the studio's change. {report.note}")
        return ()

    # --------------------------------------------------------------------------------------------- merging
    def submit_merge(self, session: str, form: MergeForm, after: Sequence[str] = ()) -> Job:
        """Queue a merge of the session's subject and style adapters; returns at once."""
        base = self.base_for(session)
        paths = self.paths(session)
        made = []  # the two adapters, when they exist already (a merge queued after trainings has none yet)
        if not after:
            for kind in ("subject", "style"):
                if self._busy(session, f"train-{kind}"):
                    raise ZipqError(f"The {kind} adapter is still training: merge when it is done.")
                if not paths.has_adapter(kind):
                    raise ZipqError(f"No {kind} adapter yet: train it in the Train tab first.")
            made = [self.adapter_of(paths, k, base) for k in ("subject", "style")]
        if form.method == "klora":
            return self._submit_klora(session, base, paths, after)
        cfg = form.config(base.family)
        if made:
            if cfg.method == "zipq" and not all(a.use_dora for a in made):
                raise ZipqError("ZipQDoRA merges two DoRA adapters; these are LoRA: choose ZipLoRA (zip) instead.")
        if self._busy(session, "merge"):
            raise ZipqError("A merge is already queued or running: wait for it or cancel it.")
        estimate = self._within_budget(plan.merge_seconds(base, cfg, self.bases.speed_of(base)), "merge",
                                       "lower the steps")
        needs = self._memory(base, "merge", merge=cfg, train=TrainConfig.for_family(base.family),
                             adapter_params=max(a.num_params() for a in made) if made else None)
        self._check_disk(paths)
        return self.registry.submit(session, "merge", functools.partial(self._merge_job, base, cfg, paths),
                                    label=f"merge ({MERGE_LABELS.get(cfg.method, cfg.method)})", after=after,
                                    estimate_s=estimate, budget_s=self.budget_s,
                                    meta={"memory": needs, "base": base.spec, "method": cfg.method})

    def _merge_job(self, base: BaseModel, cfg: MergeConfig, paths: SessionPaths, ctx: JobContext):
        staging = paths.merged.with_name("merged.new")  # the earlier merge stays until this one succeeds
        shutil.rmtree(staging, ignore_errors=True)
        try:
            # read (and checked) once: what a queued merge finds may have changed since it was queued
            subject, style = (self.adapter_of(paths, kind, base) for kind in ("subject", "style"))
            for record in merge_adapters(base, subject, style, cfg, staging, cancel=ctx.cancel,
                                         views=(paths.adapter("subject"), paths.adapter("style"))):
                if record.done:
                    shutil.rmtree(paths.merged, ignore_errors=True)
                    staging.rename(paths.merged)
                    record.adapter_dir = paths.merged
                    sessions.record_made_from(paths)
                    paths.klora.unlink(missing_ok=True)  # the latest merge is the one generation uses
                yield record
        finally:  # a failed or cancelled merge leaves nothing half-written
            shutil.rmtree(staging, ignore_errors=True)

    def _submit_klora(self, session: str, base: BaseModel, paths: SessionPaths, after: Sequence[str]) -> Job:
        """K-LoRA has no merged file: its "merge" is a short job that checks the two adapters and records the choice;
        generation then scores their layers and picks one adapter per layer at every step (zipq_core.merge.klora).
        An earlier merged adapter stays on disk (and downloadable) but is not used while K-LoRA is chosen."""
        if self._busy(session, "merge"):
            raise ZipqError("A merge is already queued or running: wait for it or cancel it.")
        return self.registry.submit(session, "merge", functools.partial(self._klora_job, base, paths),
                                    label=f"merge ({MERGE_LABELS['klora']})", after=after, estimate_s=1.0,
                                    budget_s=self.budget_s, meta={"base": base.spec, "method": "klora"})

    def _klora_job(self, base: BaseModel, paths: SessionPaths, ctx: JobContext):
        ctx.progress(0, 1)
        for kind in ("subject", "style"):
            if not paths.has_adapter(kind):
                raise ZipqError(f"No {kind} adapter yet: train it in the Train tab first.")
            self.adapter_of(paths, kind, base)
        paths.klora.write_text(json.dumps({"method": "klora", **asdict(KLoraConfig())}))
        ctx.progress(1, 1)
        ctx.log("K-LoRA chosen: each image picks, at every denoising step, the subject's or the style's change for "
                "each layer (no merged file to download).")
        return ()

    def uses_klora(self, paths: SessionPaths) -> bool:
        return paths.klora.exists() and all(paths.has_adapter(k) for k in ("subject", "style"))

    # ------------------------------------------------------------------------------------------ generation
    def slider_adapters(self, paths: SessionPaths, sliders: Sliders, base: BaseModel) -> list[AdapterSpec]:
        """The merged adapter's parts at the slider strengths, else the two adapters themselves (the subject one at
        `subject_detail` × its strength in the fine-detail steps, as for a merge). An adapter made on another base
        is refused with a message."""
        if paths.has_adapter("merged"):
            self.adapter_of(paths, "merged", base)
            return slider_adapters(paths.merged, sliders.subject, sliders.style, sliders.subject_detail)
        specs: list[AdapterSpec] = []
        if paths.has_adapter("subject"):
            specs.append(detail_spec(self.adapter_of(paths, "subject", base), sliders.subject,
                                     sliders.subject_detail))
        if paths.has_adapter("style"):
            specs.append((self.adapter_of(paths, "style", base), sliders.style))
        return specs

    def submit_generate(self, session: str, form: GenerateForm, after: Sequence[str] = ()) -> Job:
        """Queue a generation; its images land in the session's outputs and the job's artifacts."""
        paths = self.paths(session)
        base = self.base_for(session)
        if not after:  # refused now rather than in the job: an adapter made on another base
            if self.uses_klora(paths):
                for kind in ("subject", "style"):
                    self.adapter_of(paths, kind, base)
            else:
                self.slider_adapters(paths, form.sliders, base)
        # Judges: one per adapter in use (a queued merge will have two parts).
        two = after or paths.has_adapter("merged") or self.uses_klora(paths)
        judges = 2 if two else sum(paths.has_adapter(k) for k in ("subject", "style"))
        estimate = self._within_budget(plan.generate_seconds(base, form.request, judges, self.bases.speed_of(base)),
                                       "generation", "make fewer or smaller images, fewer steps or fewer candidates "
                                       "per image")
        needs = self._memory(base, "generate", generate=form.request, adapters=judges,
                             train=TrainConfig.for_family(base.family))
        self._check_disk(paths)
        return self.registry.submit(session, "generate", functools.partial(self._generate_job, base, form, paths),
                                    label="generate", after=after, estimate_s=estimate, budget_s=self.budget_s,
                                    meta={"note": self._generation_note(form), "seed": form.request.seed,
                                          "memory": needs, "base": base.spec})

    def _generation_note(self, form: GenerateForm) -> str:
        s, r = form.sliders, form.request
        note = (f"subject strength {s.subject:g}, style strength {s.style:g}, subject in fine detail "
                f"{s.subject_detail:g} below noise level {r.handoff:g}")
        return note + (f", each image the best of {r.candidates} candidates" if r.candidates > 1 else "")

    def _generate_job(self, base: BaseModel, form: GenerateForm, paths: SessionPaths, ctx: JobContext):
        schedule = None
        if klora := self.uses_klora(paths):
            for kind in ("subject", "style"):
                self.adapter_of(paths, kind, base)
            chosen = klora_plan(base, paths.adapter("subject"), paths.adapter("style"), form.sliders, KLoraConfig())
            adapters, schedule = chosen.adapters, chosen.schedule
        else:
            adapters = self.slider_adapters(paths, form.sliders, base)
        started = time.time()
        images = generate(base, form.request, adapters, on_step=ctx.progress, cancel=ctx.cancel, schedule=schedule)
        for i, path in enumerate(save_pngs(images, paths.outputs, f"gen-{form.request.seed}")):
            ctx.artifact(f"image{i}", path)
        used = ("the merged adapter" + ("" if sessions.merged_is_current(paths) else
                                        " (made from earlier adapters: merge again to use the new ones)"))
        if klora:
            used = "K-LoRA (the subject and style adapters, one per layer at each step)"
        elif not paths.has_adapter("merged"):
            used = f"{len(adapters)} adapter(s)" if adapters else "the base model alone (no adapters trained yet)"
        ctx.log(f"{len(images)} image(s) in {time.time() - started:.1f} s with {used}.")
        return ()

    def compare_variants(self, paths: SessionPaths, base: BaseModel) -> list[tuple[str, object]]:
        """Base, each adapter alone, the direct merge and what generation uses (the learned merge at the Generate
        tab's starting sliders, or K-LoRA), one candidate each: (label, adapters), where K-LoRA's entry is a
        function that builds its plan (it scores layers under the base's lock: job work, not request work)."""
        have = {k: paths.has_adapter(k) for k in ("subject", "style", "merged")}
        if not (have["subject"] or have["style"]):
            raise ZipqError("Train a subject and a style adapter first: there is nothing to compare yet.")
        ad = {k: self.adapter_of(paths, k, base) for k in ("subject", "style") if have[k]}
        variants: list[tuple[str, object]] = [("base", [])]
        variants += [(f"{k} only", [(ad[k], 1.0)]) for k in ("subject", "style") if k in ad]
        if len(ad) == 2:
            variants.append(("direct merge", [(ad["subject"], 1.0), (ad["style"], 1.0)]))
        s = Sliders()  # what the Generate tab starts with
        if self.uses_klora(paths):
            variants.append(("K-LoRA", functools.partial(klora_plan, base, paths.adapter("subject"),
                                                         paths.adapter("style"), s, KLoraConfig())))
        elif have["merged"]:
            method = self.adapter_of(paths, "merged", base).info.get("method", "merged")
            if method != "direct":
                variants.append((MERGE_LABELS.get(method, method),
                                 slider_adapters(paths.merged, s.subject, s.style, s.subject_detail)))
        return variants

    def submit_compare(self, session: str, prompt: str, seed, steps, num_images) -> Job:
        paths = self.paths(session)
        base = self.base_for(session)
        size = base.default_size
        cfg = GenerateConfig(prompt=prompt or "", seed=number(seed, "Seed", int), steps=number(steps, "Steps", int),
                             width=size, height=size, num_images=number(num_images, "Images per variant", int))
        variants = self.compare_variants(paths, base)
        estimate = len(variants) * plan.generate_seconds(base, cfg, 0, self.bases.speed_of(base))
        self._within_budget(estimate, "comparison", "compare fewer images or with fewer steps")
        self._check_disk(paths)
        return self.registry.submit(session, "compare", functools.partial(self._compare_job, base, cfg, paths),
                                    label="compare", estimate_s=estimate, budget_s=self.budget_s,
                                    meta={"base": base.spec})

    def _compare_job(self, base: BaseModel, cfg: GenerateConfig, paths: SessionPaths, ctx: JobContext):
        variants = self.compare_variants(paths, base)
        refs = {kind: views[0] for kind in ("subject", "style")
                if paths.has_adapter(kind) and (views := load_training_views(paths.adapter(kind)))}
        rows = []
        for v, (name, adapters) in enumerate(variants):
            schedule = None
            if callable(adapters):  # K-LoRA: its per-step choice of layers
                chosen = adapters()
                adapters, schedule = chosen.adapters, chosen.schedule
            images = generate(base, cfg, adapters, cancel=ctx.cancel, schedule=schedule,
                              on_step=lambda i, n, v=v: ctx.progress(v * n + i, len(variants) * n))
            for i, path in enumerate(save_pngs(images, paths.outputs, f"compare-{v}-{cfg.seed}")):
                ctx.artifact(f"cmp{v}-{i}", path)
            rows.append(score_row(name, images, refs, cfg.prompt) if base.is_mini else [name])
        ctx.job.meta.update({"variants": [name for name, _ in variants], "rows": rows})
        return ()

    # ---------------------------------------------------------------------------------------- whole flow
    def run_flow(self, session: str, subject_name: str, style_name: str, steps, style_steps, merge_method: str,
                 merge_steps, prompt: str, seed) -> tuple[tuple[Stored, Stored] | None, list[Job], str]:
        """Load the examples when a tab is empty, then queue: train subject → train style → merge → generate.

        Returns:
            (the examples loaded, or None when the session had images of its own; the jobs; the prompt used).
        """
        paths = self.paths(session)
        base = self.base_for(session)
        d = family_defaults(base.family)
        if any(j.status not in FINISHED for j in self.registry.jobs_for(session)):
            raise ZipqError("This session already has jobs queued or running: wait for them, or cancel them.")
        empty = not (paths.images("subject").exists() and paths.images("style").exists())
        loaded = self.load_examples(session, subject_name, style_name) if empty else None
        s = paths.read_settings()
        prompt = s.prompt if empty or not (prompt or "").strip() else prompt
        form = TrainForm(which="both", steps=number(steps or d.steps, "Subject steps", int),
                         style_steps=number(style_steps or d.steps_for("style"), "Style steps", int),
                         learning_rate=d.learning_rate, rank=d.rank, resolution=base.default_size, previews=3)
        jobs = self.submit_training(session, form)
        method = merge_method if merge_method in (*METHODS, "klora") else "zipq"
        merge = MergeForm(method=method, steps=number(merge_steps or 100, "Merge steps", int))
        jobs.append(self.submit_merge(session, merge, after=[j.id for j in jobs]))
        size = base.default_size
        request = GenerateConfig(prompt=prompt, seed=number(seed or 0, "Seed", int), width=size, height=size,
                                 num_images=4, candidates=d.candidates)
        jobs.append(self.submit_generate(session, GenerateForm(request, Sliders()), after=[jobs[-1].id]))
        paths.write_settings(replace(s, flow_jobs=tuple(j.id for j in jobs)))
        return loaded, jobs, prompt


# ------------------------------------------------------------------------------------------------- helpers
def download_formats() -> dict[str, str]:
    """Format name → one line, for the download choice (zipq_core.adapters.export.FORMATS; none without it)."""
    try:
        from zipq_core.adapters.export import FORMATS
    except ImportError:
        return {}
    return dict(FORMATS)


def export_target(paths: SessionPaths, kind: str, fmt: str) -> tuple[Path, Path]:
    """Where an export of the session's adapter goes and the file a download serves: named by the adapter's
    weights, so a new training or merge is exported afresh."""
    digest = sessions.weights_digest(paths.merged if kind == "merged" else paths.adapter(kind))
    if fmt == "int8":  # the INT8 format is the studio's folder
        out = inside(paths.root, "exports", f"{kind}-int8-{digest}")
        return out, out / INT8_WEIGHTS_NAME
    out = inside(paths.root, "exports", f"{kind}-{fmt}-{digest}.safetensors")
    return out, out


def export_file(folder: Path, base: BaseModel, fmt: str, out: Path):
    """Write the adapter in `folder` in format `fmt` (zipq_core.adapters.export: the one place the studio writes
    other tools' files), beside `out` first, so a failed export leaves nothing a download would serve."""
    from zipq_core.adapters.export import export_adapter

    tmp = out.with_name(f"{out.name}-tmp" if fmt == "int8" else f"{out.stem}-tmp{out.suffix}")
    _remove(tmp)
    try:
        report = export_adapter(load_adapter(folder), base, fmt, tmp, dtype=base.adapter_dtype)
        _remove(out)
        tmp.rename(out)
    finally:
        _remove(tmp)
    return report


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def read_adapter(source: Path, base: BaseModel, max_bytes: int) -> Adapter:
    """Any supported adapter file or peft folder → an `Adapter` for `base` (zipq_core's importer; the one place the
    studio reads foreign files)."""
    from zipq_core.adapters.imports import import_adapter

    try:
        return import_adapter(source, base=base, max_bytes=max_bytes)
    except ZipqError:
        raise
    except Exception as e:  # a damaged file: name it, without a traceback
        raise ZipqError(f"{Path(source).name} could not be read as an adapter ({type(e).__name__}: {e}). Is it a "
                        "complete .safetensors LoRA file?") from e


def check_adapter_fits(adapter: Adapter, base: BaseModel) -> None:
    """Every layer of the adapter names a module of `base` with the shapes its factors need."""
    for key, layer in adapter.layers.items():
        weight = resolve_module(base.pipe, key).weight
        if layer.up.shape[0] != weight.shape[0] or math.prod(layer.down.shape[1:]) != math.prod(weight.shape[1:]):
            raise ZipqError(f"The adapter's layer {key} has the wrong shape for this base model "
                            f"({tuple(layer.up.shape[:1]) + tuple(layer.down.shape[1:])} vs {tuple(weight.shape)}): "
                            "it was made for another model.")


def example_names(kind: str) -> list[str]:
    folder = EXAMPLES / ("subjects" if kind == "subject" else "styles")
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


def example_files(group: str, name: str) -> list[Path]:
    """An example set's images and their caption sidecars (`<i>.txt`, read by the data stage)."""
    folder = EXAMPLES / group / name
    return sorted(folder.glob("*.png")) + sorted(folder.glob("*.txt"))


def save_pngs(images: Sequence, folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}-{stamp}-{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def score_row(name: str, images: list, refs: dict, prompt: str) -> list:
    """One Compare-table row from the offline evaluator: subject/style probability and similarity, prompt."""
    from zipq_mini.evaluator import evaluate_images

    r = evaluate_images(images, subject_ref=refs.get("subject"), style_ref=refs.get("style"), prompt=prompt)
    sub, sty, pr = r.get("subject", {}), r.get("style", {}), r.get("prompt", {})
    return [name, round(sub.get("prob", float("nan")), 3), round(sub.get("cosine", float("nan")), 3),
            round(sty.get("prob", float("nan")), 3), round(sty.get("cosine", float("nan")), 3),
            None if pr.get("acc") is None else round(pr["acc"], 3)]
