"""ZipQDoRA Studio: the Gradio app (upload → train → merge with sliders → generate → compare).

A thin layer over `zipq_core`: every action is a core call; long work (training, merging) runs in the
core's job registry (`zipq_core.jobs`) apart from the request, and the page polls it with a `gr.Timer`, so
a reload or a second tab re-attaches to the same jobs. Each visitor has a session id kept in the browser
(`gr.BrowserState`) and a work folder of their own, removed after a time-to-live.

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--auth user:pass] [--base mini]

Every main action has a named API endpoint (`api_name`), so `gradio_client` can script the studio; the
endpoints take the session id as their first argument (get one from `/new_session`).
"""

from __future__ import annotations

import argparse
import functools
import html
import importlib.util
import json
import logging
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr

from zipq_core import GenerateConfig, TrainConfig, ZipqError, generate, load_adapter, load_base, train_adapter
from zipq_core.adapters import INT8_DIR, load_training_views, save_adapter
from zipq_core.base import BaseModel
from zipq_core.config import (
    MAX_CANDIDATES,
    METHODS,
    TOKEN_PATTERN,
    MergeConfig,
    Sliders,
    check_noun,
    check_strength,
    check_token,
    family_defaults,
)
from zipq_core.data import DataConfig, ImageSet, prepare_images
from zipq_core.generation import detail_spec
from zipq_core.jobs import FINISHED, Job, JobContext, JobRegistry, check_session_id, inside, new_session_id
from zipq_core.merge import merge_adapters, slider_adapters
from zipq_core.train import latest_checkpoint

try:  # ZeroGPU Spaces: GPU work must be decorated; elsewhere `spaces` is absent and this is a no-op.
    import spaces

    gpu_task: Callable = spaces.GPU(duration=120)
except ImportError:
    def gpu_task(fn: Callable) -> Callable:
        return fn

log = logging.getLogger("zipq.app")

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "assets" / "examples"
DEFAULT_WORK_DIR = ROOT / "runs" / "sessions"
DEFAULT_SUBJECT_EXAMPLE, DEFAULT_STYLE_EXAMPLE = "heart", "zigzag"
SUBJECT_TOKEN, STYLE_TOKEN = "sks", "zkz"
# Issue 5: 3–10 subject images, 1–5 style images.
LIMITS = {"subject": (3, 10), "style": (1, 5)}
TOKEN_SUGGESTIONS = {"subject": ["sks", "ohwx", "zwx"], "style": ["zkz", "xyz", "szn"]}
GENERAL_NOUNS = ["dog", "cat", "person", "mug", "toy", "car", "plant"]
# The recipe the benchmarks measure (bench/personalization.py, bench/merge_quality.py): 300 steps per adapter at
# the core's learning rate. The whole example flow then stays well under 5 minutes on a 2-core CPU.
FLOW_STEPS = 300
MAX_FILE_SIZE = "20mb"
POLL_SECONDS = 1.0
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
# One colour per curve (each plot holds one series: see `loss_frame`).
SERIES_COLOURS = {"subject": "#4f46e5", "style": "#f97316", "merge": "#16a34a"}
MERGE_LABELS = {"zipq": "ZipQDoRA", "zip": "ZipLoRA", "direct": "direct (weighted sum)", "ties": "TIES",
                "dare": "DARE", "blora": "B-LoRA"}


# -------------------------------------------------------------------------------------------- core checks
def qdora_available() -> bool:
    """Training on a quantized base needs `zipq_core.train.qdora`; the option is refused clearly when absent."""
    return importlib.util.find_spec("zipq_core.train.qdora") is not None


def example_names(kind: str) -> list[str]:
    folder = EXAMPLES / ("subjects" if kind == "subject" else "styles")
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


# -------------------------------------------------------------------------------------- errors → messages
def user_errors(fn: Callable) -> Callable:
    """Turn core errors into page messages: a `ZipqError` as it is, anything else as a short generic line.

    The traceback of an unexpected error goes to the server log only; the page never shows one.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ZipqError as e:
            # gr.Error renders HTML: escape the message and keep its line breaks (lists of skipped files).
            text = html.escape(str(e)).replace("\n", "<br>")
            raise gr.Error(text, title="Cannot do that", print_exception=False) from None
        except Exception as e:
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"Something went wrong on the server ({type(e).__name__}). The details are in the "
                           "server log; try again, or reload the page.", print_exception=False) from None

    return wrapper


# ------------------------------------------------------------------------------------------ session files
@dataclass
class Settings:
    """What a session remembers besides its files: the words that name its concepts, its flow's jobs."""

    subject_token: str = SUBJECT_TOKEN
    class_noun: str = ""
    style_token: str = STYLE_TOKEN
    style_noun: str = ""
    flow_jobs: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        noun = f" {self.class_noun}" if self.class_noun else ""
        return f"a photo of {self.subject_token}{noun} in {self.style_token} style"


@dataclass(frozen=True)
class SessionPaths:
    """Where one session keeps things under its work folder."""

    root: Path

    def images(self, kind: str) -> Path:
        return self.root / kind / "images"

    def adapter(self, kind: str) -> Path:
        return self.root / "adapters" / kind

    @property
    def merged(self) -> Path:
        return self.root / "adapters" / "merged"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def settings_file(self) -> Path:
        return self.root / "settings.json"

    def has_adapter(self, kind: str) -> bool:
        folder = self.merged if kind == "merged" else self.adapter(kind)
        return (folder / ADAPTER_FILE).exists()


def read_settings(paths: SessionPaths) -> Settings:
    try:
        data = json.loads(paths.settings_file.read_text())
        data["flow_jobs"] = tuple(data.get("flow_jobs", ()))
        return Settings(**data)
    except (OSError, ValueError, TypeError):
        return Settings()


def write_settings(paths: SessionPaths, settings: Settings) -> None:
    paths.settings_file.write_text(json.dumps(asdict(settings), indent=1))


def copy_uploads(files: Sequence[str], folder: Path) -> list[Path]:
    """Copy uploads into a fresh folder, keeping their names (a repeated name gets a numeric suffix)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    copies = []
    for src in files:
        src = Path(src)
        dst, n = inside(folder, src.name), 1
        while dst.exists():
            n += 1
            dst = inside(folder, f"{src.stem}_{n}{src.suffix}")
        shutil.copyfile(src, dst)
        copies.append(dst)
    return copies


def drop_rejected(folder: Path, image_set: ImageSet) -> None:
    """Remove skipped files from the session's folder so training sees only usable images."""
    for r in image_set.rejected:
        (folder / r.name).unlink(missing_ok=True)


def download_copy(src: Path, dst: Path) -> Path:
    """A copy of an adapter file under a telling name (refreshed when the source is newer)."""
    if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


def number(value: Any, name: str, kind: type = float) -> Any:
    """A form field's number, or a message naming the field (an emptied number box sends None)."""
    try:
        return kind(float(value))
    except (TypeError, ValueError):
        raise ZipqError(f"{name} needs a number (the field is empty or not a number).") from None


# -------------------------------------------------------------------------------------- display helpers
def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def job_line(job: Job | None, position: int, name: str) -> str:
    """One Markdown line about a job: status, step, loss, ETA, queue position or error."""
    if job is None:
        return f"**{name}**: not started."
    snap = job.snapshot(position)
    head = f"**{name}** · {snap['status']}"
    if snap["status"] == "queued":
        return f"{head} (position {position} in the queue)"
    if snap["status"] == "failed":
        return f"{head}: {snap['error']}"
    parts = [head]
    if snap["total"]:
        parts.append(f"step {snap['step']}/{snap['total']}")
    if snap["loss"] is not None:
        parts.append(f"loss {snap['loss']:.4f}")
    if snap["status"] == "running" and snap["eta"] is not None:
        parts.append(f"ETA {fmt_seconds(snap['eta'])}")
    if snap["status"] in FINISHED and snap["started"] and snap["finished"]:
        parts.append(f"took {fmt_seconds(snap['finished'] - snap['started'])}")
    if snap["status"] == "cancelled" and snap["error"]:
        parts.append(snap["error"])
    return " · ".join(parts)


def loss_frame(job: Job | None, series: str):
    """One job's loss curve as a table (step, loss, series) for `gr.LinePlot`; `gr.skip()` while it has none.

    Gradio 6.31's plot draws nothing after it once received an empty table, and never draws a colour series
    that was absent from its first table: hence one plot per job kind and no empty updates.
    """
    import pandas as pd

    rows = [{"step": p.step, "loss": p.loss, "series": series}
            for p in (list(job.progress) if job is not None else []) if p.loss == p.loss]  # drops NaN set-up rows
    if not rows:
        return gr.skip()
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64",
                                                                          "series": "str"})


def rejected_markdown(image_set: ImageSet | None, error: str | None = None) -> str:
    """The data stage's summary (or refusal) as Markdown: counts, then one bullet per skipped file."""
    text = f"⚠️ {error}" if error else (image_set.summary() if image_set is not None else "")
    return text.replace("\n- ", "\n\n- ")


# ------------------------------------------------------------------------------------------------ the studio
class Studio:
    """The app's state and actions; every method a page event calls is wrapped by `user_errors`."""

    def __init__(self, base: BaseModel, registry: JobRegistry):
        self.base = base
        self.registry = registry

    # ---- sessions
    def paths(self, session: str) -> SessionPaths:
        return SessionPaths(self.registry.session_dir(check_session_id(session)))

    @user_errors
    def new_session(self) -> str:
        """A fresh session id (what the page keeps in the browser; scripts pass it to every endpoint)."""
        self.registry.cleanup()  # a cheap moment to forget sessions past their time-to-live
        session = new_session_id()
        self.registry.session_dir(session)
        return session

    @user_errors
    def restore(self, stored: str | None) -> tuple:
        """On page load: keep the browser's session (re-attaching to its jobs and files) or start one."""
        try:
            session = check_session_id(stored or "")
        except ZipqError:
            session = self.new_session()
        paths = self.paths(session)
        s = read_settings(paths)
        subject = self._preview("subject", paths, s)
        style = self._preview("style", paths, s)
        return (session, session, *subject, *style, s.subject_token, s.class_noun, s.style_token, s.style_noun,
                s.prompt, None)

    def _preview(self, kind: str, paths: SessionPaths, s: Settings) -> tuple[list, str]:
        """Gallery and notes for a session's stored images (empty when there are none)."""
        folder = paths.images(kind)
        if not folder.exists() or not any(folder.iterdir()):
            return [], ""
        try:
            image_set = self._prepare(kind, folder, s)
        except ZipqError as e:
            return [], rejected_markdown(None, str(e))
        return gallery_of(image_set), rejected_markdown(image_set)

    # ---- data
    def _data_config(self, kind: str, resolution: int | None = None) -> DataConfig:
        low, high = LIMITS[kind]
        return DataConfig(resolution=resolution or self.base.default_size, min_images=low, max_images=high)

    def _caption(self, kind: str, s: Settings) -> str:
        if kind == "subject":
            return TrainConfig(kind="subject", token=s.subject_token, class_noun=s.class_noun).instance_prompt
        return TrainConfig(kind="style", token=s.style_token, class_noun=s.style_noun).instance_prompt

    def _prepare(self, kind: str, sources, s: Settings, resolution: int | None = None) -> ImageSet:
        token = s.subject_token if kind == "subject" else s.style_token
        return prepare_images(sources, self._caption(kind, s), self._data_config(kind, resolution), token=token)

    def _store_images(self, kind: str, session: str, files: Sequence[str] | None, token: str, noun: str) -> tuple:
        if not files:
            raise ZipqError(f"Upload {LIMITS[kind][0]}–{LIMITS[kind][1]} {kind} images first (PNG, JPEG or WebP).")
        files = [f if isinstance(f, str) else f.name for f in files]
        paths = self.paths(session)
        s = self._with_words(read_settings(paths), kind, token, noun)
        folder = paths.images(kind)
        copies = copy_uploads(files, folder)
        try:
            image_set = self._prepare(kind, copies, s)
        except ZipqError:
            shutil.rmtree(folder, ignore_errors=True)  # nothing half-usable is kept
            raise
        drop_rejected(folder, image_set)
        guess = self._noun_guess(kind, image_set)
        if kind == "subject" and guess and not s.class_noun:  # an empty class noun takes the evaluator's guess
            s = self._with_words(s, kind, s.subject_token, guess)
        write_settings(paths, s)
        noun_now = s.class_noun if kind == "subject" else s.style_noun
        noun_box = gr.Dropdown(choices=noun_choices(kind, self.base.is_mini, guess), value=noun_now)
        return gallery_of(image_set), rejected_markdown(image_set), noun_box, s.prompt

    def _with_words(self, s: Settings, kind: str, token: str, noun: str) -> Settings:
        token, noun = (token or "").strip(), (noun or "").strip()
        check_token(token, f"The {kind} token")
        check_noun(noun, "The class noun" if kind == "subject" else "What the style images show")
        if kind == "subject":
            return replace(s, subject_token=token, class_noun=noun)
        return replace(s, style_token=token, style_noun=noun)

    def _noun_guess(self, kind: str, image_set: ImageSet) -> str | None:
        """On mini the offline evaluator names what the subject images show (a class-noun suggestion)."""
        if kind != "subject" or not self.base.is_mini:
            return None
        return evaluator_guess([t.image for t in image_set.images])

    @user_errors
    def prepare_subject(self, session: str, files: list[str] | None, token: str, class_noun: str) -> tuple:
        """Check and crop the subject uploads; show the training views and every skipped file's reason."""
        return self._prepare_or_explain("subject", session, files, token, class_noun)

    @user_errors
    def prepare_style(self, session: str, files: list[str] | None, token: str, noun: str) -> tuple:
        """The same for the style uploads."""
        return self._prepare_or_explain("style", session, files, token, noun)

    def _prepare_or_explain(self, kind: str, session: str, files, token: str, noun: str) -> tuple:
        """A refused upload is explained beside it (every skipped file with its reason) and in a toast."""
        check_session_id(session)
        try:
            return self._store_images(kind, session, files, token, noun)
        except ZipqError as e:
            gr.Warning(html.escape(str(e).splitlines()[0]), title=f"{kind.title()} images not usable")
            return [], rejected_markdown(None, str(e)), gr.skip(), gr.skip()

    @user_errors
    def remember_words(self, session: str, subject_token: str, class_noun: str, style_token: str,
                       style_noun: str) -> str:
        """Keep the tokens with the session and refill the prompt from them."""
        paths = self.paths(session)
        s = read_settings(paths)
        s = self._with_words(self._with_words(s, "subject", subject_token, class_noun), "style", style_token,
                             style_noun)
        write_settings(paths, s)
        return s.prompt

    @user_errors
    def load_examples(self, session: str, subject_name: str, style_name: str) -> tuple:
        """Fill the Subject and Style tabs from `assets/examples` (tokens sks / zkz, class = folder name)."""
        return self._load_examples(session, subject_name, style_name)

    def _load_examples(self, session: str, subject_name: str, style_name: str) -> tuple:
        subject_name = subject_name or DEFAULT_SUBJECT_EXAMPLE
        style_name = style_name or DEFAULT_STYLE_EXAMPLE
        if subject_name not in example_names("subject") or style_name not in example_names("style"):
            raise ZipqError(f"Unknown example: choose a subject from {example_names('subject')} and a style "
                            f"from {example_names('style')}.")
        sub = self._store_images("subject", session, example_files("subjects", subject_name), SUBJECT_TOKEN,
                                 subject_name)
        sty = self._store_images("style", session, example_files("styles", style_name), STYLE_TOKEN, "")
        return (sub[0], sub[1], SUBJECT_TOKEN, subject_name, sty[0], sty[1], STYLE_TOKEN, "", sty[3])

    # ---- training
    def _train_config(self, kind: str, s: Settings, method: str, quantize: str, rank: float, steps: float,
                      lr: float, resolution: float, prior: bool, sample_every: float) -> TrainConfig:
        if quantize != "none" and not qdora_available():
            raise ZipqError("Training on a quantized base (QDoRA) is not available in this build yet: choose "
                            "'none' for the base; the INT8 adapter option works.")
        token, noun = (s.subject_token, s.class_noun) if kind == "subject" else (s.style_token, s.style_noun)
        steps = number(steps, "Steps", int)
        return TrainConfig(kind=kind, token=token, class_noun=noun, method=method, rank=number(rank, "Rank", int),
                           learning_rate=number(lr, "Learning rate"), steps=steps,
                           resolution=number(resolution, "Resolution", int),
                           prior_preservation=bool(prior) and kind == "subject", quantize_base=quantize,
                           sample_every=number(sample_every, "Preview every N steps", int),
                           checkpoint_every=max(10, steps // 4))

    def _train_job(self, kind: str, cfg: TrainConfig, int8: bool, resume: bool, paths: SessionPaths,
                   ctx: JobContext):
        """The job body: prepare the stored images, run the core's trainer, optionally save an INT8 copy."""
        out = paths.adapter(kind)
        if not resume:
            shutil.rmtree(out, ignore_errors=True)  # stale checkpoints would be picked up by a later resume
        if paths.merged.exists():
            shutil.rmtree(paths.merged, ignore_errors=True)
            ctx.log("The merged adapter was removed: it no longer matches the retrained adapter.")
        # The caption comes from the config made at submission, even if the tokens were edited since.
        images = prepare_images(paths.images(kind), cfg.instance_prompt, self._data_config(kind, cfg.resolution),
                                token=cfg.token)
        yield from train_adapter(self.base, images, cfg, out, resume=resume, cancel=ctx.cancel,
                                 info={"base": self.base.spec})
        if int8 and (out / ADAPTER_FILE).exists():
            ctx.artifact("int8", save_adapter(load_adapter(out), out / INT8_DIR, storage="int8"))
            ctx.log("Saved an INT8 copy of the adapter.")

    def _submit_training(self, session: str, kinds: Sequence[str], settings: tuple, int8: bool,
                         resume: bool) -> list[Job]:
        paths = self.paths(session)
        s = read_settings(paths)
        cfgs = [self._train_config(kind, s, *settings) for kind in kinds]  # validate all before starting any
        for kind in kinds:
            if not paths.images(kind).exists():
                raise ZipqError(f"No {kind} images yet: upload them in the {kind.title()} tab (or load the examples).")
            if self._busy(session, f"train-{kind}"):
                raise ZipqError(f"A {kind} training is already queued or running: wait for it or cancel it.")
            if resume and latest_checkpoint(paths.adapter(kind)) is None:
                raise ZipqError(f"Nothing to resume for the {kind}: no checkpoint yet. Start a training instead.")
        return [self.registry.submit(session, f"train-{kind}",
                                     functools.partial(self._train_job, kind, cfg, bool(int8), resume, paths),
                                     label=f"train {kind}")
                for kind, cfg in zip(kinds, cfgs, strict=True)]

    def _busy(self, session: str, kind: str) -> bool:
        job = self.registry.latest(session, kind)
        return job is not None and job.status not in FINISHED

    @user_errors
    def train(self, session: str, which: str, method: str, quantize: str, int8: bool, rank: float, steps: float,
              lr: float, resolution: float, prior: bool, sample_every: float) -> str:
        """Queue training of the subject, the style or both (one after the other); returns at once."""
        kinds = ["subject", "style"] if which == "both" else [which]
        jobs = self._submit_training(session, kinds, (method, quantize, rank, steps, lr, resolution, prior,
                                                      sample_every), int8, resume=False)
        return "Queued: " + ", ".join(f"{j.label} (job {j.id})" for j in jobs)

    @user_errors
    def resume(self, session: str, which: str, method: str, quantize: str, int8: bool, rank: float, steps: float,
               lr: float, resolution: float, prior: bool, sample_every: float) -> str:
        """Continue a cancelled training from its newest checkpoint (same settings as when it started)."""
        kinds = ["subject", "style"] if which == "both" else [which]
        jobs = self._submit_training(session, kinds, (method, quantize, rank, steps, lr, resolution, prior,
                                                      sample_every), int8, resume=True)
        return "Resuming: " + ", ".join(f"{j.label} (job {j.id})" for j in jobs)

    @user_errors
    def cancel(self, session: str, what: str = "all") -> str:
        """Cancel the session's unfinished jobs whose kind starts with `what` ('train', 'merge' or 'all')."""
        check_session_id(session)
        prefix = "" if what == "all" else what
        jobs = [j for j in self.registry.jobs_for(session) if j.status not in FINISHED and j.kind.startswith(prefix)]
        for job in jobs:
            self.registry.cancel(job.id)
        return f"Cancelling {len(jobs)} job(s); a running one stops after its current step." if jobs else \
            "Nothing to cancel."

    # ---- merging
    def _merge_config(self, method: str, lam: float, steps: float, subject_weight: float, style_weight: float,
                      density: float):
        return MergeConfig(method=method, steps=number(steps, "Steps", int), lam=number(lam, "λ"),
                           subject_weight=number(subject_weight, "Subject weight"),
                           style_weight=number(style_weight, "Style weight"), density=number(density, "Density"))

    def _merge_job(self, cfg, paths: SessionPaths, ctx: JobContext):
        shutil.rmtree(paths.merged, ignore_errors=True)
        yield from merge_adapters(self.base, paths.adapter("subject"), paths.adapter("style"), cfg, paths.merged,
                                  cancel=ctx.cancel)

    def _submit_merge(self, session: str, cfg, after: Sequence[str] = ()) -> Job:
        paths = self.paths(session)
        if not after:
            for kind in ("subject", "style"):
                if self._busy(session, f"train-{kind}"):
                    raise ZipqError(f"The {kind} adapter is still training: merge when it is done.")
                if not paths.has_adapter(kind):
                    raise ZipqError(f"No {kind} adapter yet: train it in the Train tab first.")
            if cfg.method == "zipq" and not all(load_adapter(paths.adapter(k)).use_dora for k in ("subject", "style")):
                raise ZipqError("ZipQDoRA merges two DoRA adapters; these are LoRA: choose ZipLoRA (zip) instead.")
        if self._busy(session, "merge"):
            raise ZipqError("A merge is already queued or running: wait for it or cancel it.")
        return self.registry.submit(session, "merge", functools.partial(self._merge_job, cfg, paths),
                                    label=f"merge ({MERGE_LABELS.get(cfg.method, cfg.method)})", after=after)

    @user_errors
    def merge(self, session: str, method: str, lam: float, steps: float, subject_weight: float,
              style_weight: float, density: float) -> str:
        """Queue a merge of the session's subject and style adapters; returns at once."""
        job = self._submit_merge(session, self._merge_config(method, lam, steps, subject_weight, style_weight,
                                                             density))
        return f"Queued: {job.label} (job {job.id})"

    # ---- generation
    def _slider_adapters(self, paths: SessionPaths, subject_strength: float, style_strength: float,
                         subject_detail: float = 1.0) -> list:
        """The merged adapter's parts at the slider strengths, else the two adapters themselves (the subject one
        at `subject_detail` × its strength in the fine-detail steps, as for a merge)."""
        s_sub = check_strength(number(subject_strength, "Subject strength"))
        s_sty = check_strength(number(style_strength, "Style strength"))
        detail = number(subject_detail, "Subject in fine detail")
        if paths.has_adapter("merged"):
            return slider_adapters(paths.merged, s_sub, s_sty, detail)
        specs = []
        if paths.has_adapter("subject"):
            specs.append(detail_spec(load_adapter(paths.adapter("subject")), s_sub, detail))
        if paths.has_adapter("style"):
            specs.append((load_adapter(paths.adapter("style")), s_sty))
        return specs

    def _gen_config(self, prompt: str, negative: str, seed: float, steps: float, guidance: float, width: float,
                    height: float, num_images: float, handoff: float = GenerateConfig.handoff,
                    candidates: float = 1) -> GenerateConfig:
        return GenerateConfig(prompt=prompt or "", negative_prompt=negative or "", seed=number(seed, "Seed", int),
                              steps=number(steps, "Steps", int), guidance=number(guidance, "Guidance"),
                              width=number(width, "Width", int), height=number(height, "Height", int),
                              num_images=number(num_images, "Images", int), handoff=number(handoff, "Hand-off"),
                              candidates=number(candidates, "Candidates per image", int))

    @user_errors
    def generate(self, session: str, prompt: str, negative: str, seed: float, steps: float, guidance: float,
                 width: float, height: float, num_images: float, subject_strength: float,
                 style_strength: float, subject_detail: float = 1.0, handoff: float = GenerateConfig.handoff,
                 candidates: float = 1) -> tuple[list, list[str], str]:
        """Generate with the merged adapter (or both adapters) at the slider strengths; PNGs are kept."""
        paths = self.paths(session)
        cfg = self._gen_config(prompt, negative, seed, steps, guidance, width, height, num_images, handoff,
                               candidates)
        adapters = self._slider_adapters(paths, subject_strength, style_strength, subject_detail)
        busy = self.registry.running()
        if busy:  # training and merging hold the model: say so rather than look stuck
            gr.Info(f"'{busy[0].label}' is using the model: your images come right after it.")
        started = time.time()
        images = render(self.base, cfg, adapters)
        files = save_pngs(images, paths.outputs, f"gen-{cfg.seed}")
        used = "the merged adapter" if paths.has_adapter("merged") else \
            (f"{len(adapters)} adapter(s)" if adapters else "the base model alone (no adapters trained yet)")
        note = (f"{len(images)} image(s) in {time.time() - started:.1f} s with {used}, subject strength "
                f"{float(subject_strength):g}, style strength {float(style_strength):g}, subject in fine detail "
                f"{float(subject_detail):g} below noise level {cfg.handoff:g}"
                + (f", each the best of {cfg.candidates} candidates." if cfg.candidates > 1 and adapters else "."))
        return [(f, f"seed {cfg.seed} · #{i + 1}") for i, f in enumerate(files)], files, note

    @user_errors
    def compare(self, session: str, prompt: str, seed: float, steps: float, num_images: float) -> tuple[list, Any]:
        """Base, subject-only, style-only, direct and the merged adapter for one prompt and seed, with scores."""
        paths = self.paths(session)
        cfg = self._gen_config(prompt, "", seed, steps, 5.0, self.base.default_size, self.base.default_size,
                               num_images)
        variants = self._compare_variants(paths)
        columns, rows = [], []
        refs = {kind: stored_views(paths, kind) for kind in ("subject", "style")}
        for name, adapters in variants:
            images = render(self.base, cfg, adapters)
            files = save_pngs(images, paths.outputs, f"compare-{name.split()[0].lower()}-{cfg.seed}")
            columns.append([(f, name) for f in files])
            rows.append(score_row(name, images, refs, cfg.prompt) if self.base.is_mini else [name])
        # Row-major: one row per image, one column per variant.
        grid = [cell for row in zip(*columns, strict=True) for cell in row]
        return gr.Gallery(value=grid, columns=len(columns)), scores_table(rows, self.base.is_mini)

    def _compare_variants(self, paths: SessionPaths) -> list[tuple[str, list]]:
        have = {k: paths.has_adapter(k) for k in ("subject", "style", "merged")}
        if not (have["subject"] or have["style"]):
            raise ZipqError("Train a subject and a style adapter first: there is nothing to compare yet.")
        ad = {k: load_adapter(paths.adapter(k)) for k in ("subject", "style") if have[k]}
        variants: list[tuple[str, list]] = [("base", [])]
        variants += [(f"{k} only", [(ad[k], 1.0)]) for k in ("subject", "style") if k in ad]
        if len(ad) == 2:
            variants.append(("direct merge", [(ad["subject"], 1.0), (ad["style"], 1.0)]))
        if have["merged"]:
            method = load_adapter(paths.merged).info.get("method", "merged")
            if method != "direct":
                s = Sliders()  # what the Generate tab starts with
                variants.append((MERGE_LABELS.get(method, method),
                                 slider_adapters(paths.merged, s.subject, s.style, s.subject_detail)))
        return variants

    # ---- the whole flow
    @user_errors
    def run_flow(self, session: str, subject_name: str, style_name: str, steps: float, merge_method: str,
                 merge_steps: float, prompt: str, seed: float) -> tuple:
        """Load the examples when a tab is empty, then queue: train subject → train style → merge → generate."""
        paths = self.paths(session)
        if any(j.status not in FINISHED for j in self.registry.jobs_for(session)):
            raise ZipqError("This session already has jobs queued or running: wait for them, or cancel them.")
        loaded = not (paths.images("subject").exists() and paths.images("style").exists())
        filled = self._load_examples(session, subject_name, style_name) if loaded else \
            tuple(gr.skip() for _ in EXAMPLE_TARGETS)
        s = read_settings(paths)
        prompt = s.prompt if loaded or not (prompt or "").strip() else prompt
        steps = int(steps or FLOW_STEPS)
        settings = ("dora", "none", 8, steps, TrainConfig.learning_rate, self.base.default_size, False,
                    max(1, steps // 3))
        jobs = self._submit_training(session, ["subject", "style"], settings, int8=False, resume=False)
        after = [j.id for j in jobs]
        method = merge_method if merge_method in METHODS else "zipq"
        merge_cfg = self._merge_config(method, 0.01, merge_steps or 100, 1.0, 1.0, 0.5)
        jobs.append(self._submit_merge(session, merge_cfg, after))
        after = [jobs[-1].id]
        size = self.base.default_size
        best_of = family_defaults(self.base.family).candidates
        cfg = self._gen_config(prompt, "", seed, 20, 5.0, size, size, 4, candidates=best_of)
        jobs.append(self.registry.submit(session, "generate", functools.partial(self._flow_generate, cfg, paths),
                                         label="generate", after=after))
        write_settings(paths, replace(s, flow_jobs=tuple(j.id for j in jobs)))
        status = "Queued the whole flow: " + " → ".join(j.label for j in jobs)
        return (*filled[:-1], prompt, status)

    def _flow_generate(self, cfg: GenerateConfig, paths: SessionPaths, ctx: JobContext):
        sliders = Sliders()
        adapters = self._slider_adapters(paths, sliders.subject, sliders.style, sliders.subject_detail)
        images = render(self.base, cfg, adapters)
        for i, f in enumerate(save_pngs(images, paths.outputs, f"flow-{cfg.seed}")):
            ctx.artifact(f"image{i}", f)
        ctx.log(f"Generated {len(images)} image(s): '{cfg.prompt}'.")
        return ()

    # ---- polling
    @user_errors
    def job_status(self, session: str) -> dict:
        """Every job of the session as JSON (status, step, loss, ETA, queue position, error, artifacts)."""
        check_session_id(session)
        return {"session": session, "jobs": [self.registry.snapshot(j.id) for j in self.registry.jobs_for(session)]}

    def poll(self, session: str, seen: Any) -> tuple:
        """The Train, Merge and flow panels; skipped entirely when nothing changed since the last tick."""
        try:
            return self._poll(session, seen)
        except ZipqError:  # no valid session yet (the page is still loading)
            return tuple(gr.skip() for _ in range(POLL_OUTPUTS))
        except Exception:  # a bug: log it, but do not pop up an error every second
            log.exception("poll failed")
            return tuple(gr.skip() for _ in range(POLL_OUTPUTS))

    def _poll(self, session: str, seen: Any) -> tuple:
        paths = self.paths(session)
        jobs = self.registry.jobs_for(session)
        key = json.dumps([[j.id, j.version] for j in jobs] + [paths.has_adapter(k) for k in
                                                                ("subject", "style", "merged")])
        if key == seen:
            return tuple(gr.skip() for _ in range(POLL_OUTPUTS))
        return (*self._train_panel(session, paths), *self._merge_panel(session, paths),
                *self._flow_panel(session, paths), key)

    def _train_panel(self, session: str, paths: SessionPaths) -> tuple:
        sub, sty = self.registry.latest(session, "train-subject"), self.registry.latest(session, "train-style")
        lines = [job_line(sub, self._pos(sub), "Subject"), job_line(sty, self._pos(sty), "Style")]
        logs = [f"- {line}" for job in (sub, sty) if job is not None for line in job.log[-4:]]
        samples = [(job.sample, f"{name} · step {job.latest.step if job.latest else 0}")
                   for name, job in (("subject", sub), ("style", sty)) if job is not None and job.sample is not None]
        return ("\n\n".join(lines + logs), loss_frame(sub, "subject"), loss_frame(sty, "style"), samples,
                self._download(paths, "subject"), self._download(paths, "style"))

    def _merge_panel(self, session: str, paths: SessionPaths) -> tuple:
        job = self.registry.latest(session, "merge")
        return (job_line(job, self._pos(job), "Merge"), loss_frame(job, "merge"), self._download(paths, "merged"))

    def _flow_panel(self, session: str, paths: SessionPaths) -> tuple:
        ids = read_settings(paths).flow_jobs
        jobs = [self.registry.get(i) for i in ids if any(j.id == i for j in self.registry.jobs_for(session))]
        if not jobs:
            return "", gr.Gallery(value=[], visible=False)
        lines = [job_line(j, self._pos(j), j.label[:1].upper() + j.label[1:]) for j in jobs]
        last = jobs[-1]
        images = [(str(p), "merged result") for k, p in sorted(last.artifacts.items()) if k.startswith("image")]
        if last.status == "done":
            lines.append(f"✅ Whole flow done in {fmt_seconds(last.finished - jobs[0].created)}.")
        return "\n\n".join(lines), gr.Gallery(value=images, visible=bool(images))

    def _pos(self, job: Job | None) -> int:
        return self.registry.position(job.id) if job is not None else 0

    def _download(self, paths: SessionPaths, kind: str):
        """A download button for an adapter file once it exists (disabled before)."""
        folder = paths.merged if kind == "merged" else paths.adapter(kind)
        if not paths.has_adapter(kind):
            return gr.DownloadButton(value=None, interactive=False)
        info = json.loads((folder / "adapter.json").read_text()) if (folder / "adapter.json").exists() else {}
        label = str(info.get("token") or info.get("method") or "adapter")
        name = f"zipq-{kind}-{label if TOKEN_PATTERN.fullmatch(label) else 'adapter'}.safetensors"
        copy = download_copy(folder / ADAPTER_FILE, inside(paths.root, "downloads", name))
        return gr.DownloadButton(value=str(copy), interactive=True)


POLL_OUTPUTS = 12  # train: status, 2 plots, samples, 2 downloads · merge: status, plot, download · flow: 2 · key


# ------------------------------------------------------------------------------------ module-level helpers
@gpu_task
def render(base: BaseModel, cfg: GenerateConfig, adapters: list) -> list:
    """The GPU work of a request (decorated for ZeroGPU): one core `generate` call."""
    return generate(base, cfg, adapters)


def save_pngs(images: Sequence, folder: Path, stem: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}-{stamp}-{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def noun_choices(kind: str, is_mini: bool, guess: str | None = None) -> list[str]:
    """Class-noun suggestions: the world's subjects on mini, everyday nouns elsewhere; a guess goes first."""
    from zipq_mini import world

    if kind == "style":
        return ["", "picture", "shape", "painting", "illustration"]
    choices = list(world.ALL_SUBJECTS) if is_mini else list(GENERAL_NOUNS)
    if guess:
        choices = [guess] + [c for c in choices if c != guess]
    return choices


def gallery_of(image_set: ImageSet) -> list[tuple]:
    """Training views labelled with the caption each one trains (a `.txt` sidecar's words included)."""
    return [(t.image, f"{t.name}: {t.caption}") for t in image_set.images]


def example_files(group: str, name: str) -> list[str]:
    """An example set's images and their caption sidecars (`<i>.txt`, read by the data stage)."""
    folder = EXAMPLES / group / name
    return [str(p) for p in sorted(folder.glob("*.png")) + sorted(folder.glob("*.txt"))]


def stored_views(paths: SessionPaths, kind: str) -> list | None:
    """The cropped training views kept beside an adapter (the evaluator's references), if any."""
    views = load_training_views(paths.adapter(kind)) if paths.has_adapter(kind) else None
    return views[0] if views else None


def evaluator_guess(images: list) -> str | None:
    """The subject class the offline evaluator sees most often in the images (mini only), or None."""
    try:
        from zipq_mini.evaluator import summarize_predictions

        counts = summarize_predictions(images)["subject"]
    except (ZipqError, OSError, KeyError):
        return None
    return next(iter(counts), None)


def score_row(name: str, images: list, refs: dict, prompt: str) -> list:
    """One Compare-table row from the offline evaluator: subject/style probability and similarity, prompt."""
    from zipq_mini.evaluator import evaluate_images

    r = evaluate_images(images, subject_ref=refs["subject"], style_ref=refs["style"], prompt=prompt)
    sub, sty, pr = r.get("subject", {}), r.get("style", {}), r.get("prompt", {})
    return [name, round(sub.get("prob", float("nan")), 3), round(sub.get("cosine", float("nan")), 3),
            round(sty.get("prob", float("nan")), 3), round(sty.get("cosine", float("nan")), 3),
            None if pr.get("acc") is None else round(pr["acc"], 3)]


def scores_table(rows: list[list], scored: bool):
    import pandas as pd

    if not scored:
        return pd.DataFrame({"variant": [r[0] for r in rows]})
    return pd.DataFrame(rows, columns=["variant", "subject prob", "subject sim", "style prob", "style sim",
                                       "prompt acc"])


def header_markdown(base: BaseModel) -> str:
    return (f"# ZipQDoRA Studio\nAny subject in any style: upload a subject and a style, train two adapters, merge "
            f"them with ZipQDoRA, generate with a strength slider for each.\n\n**Base model:** `{base.describe()}`"
            f" · **device:** `{base.device}`")


# ---------------------------------------------------------------------------------------------------- layout
@dataclass
class UI:
    """The components that events read and write (built by `build_ui`, wired by `wire`)."""

    c: dict[str, Any]

    def __getitem__(self, name: str):
        return self.c[name]

    def __call__(self, *names: str) -> list:
        return [self.c[n] for n in names]


def _images_tab(c: dict, kind: str, base: BaseModel) -> None:
    low, high = LIMITS[kind]
    what = "subject (a thing: the same object, pet, character)" if kind == "subject" else \
        "style (the look you want: a painting, a texture, an illustration style)"
    gr.Markdown(f"Upload **{low}–{high}** images of the {what}. Each is checked, turned upright, converted to RGB and "
                f"centre-cropped to a square of {base.default_size} px; files that cannot be used are listed with "
                "the reason.")
    with gr.Row():
        with gr.Column(scale=1):
            c[f"{kind}_files"] = gr.File(label=f"{kind.title()} images", file_count="multiple",
                                         file_types=["image", ".txt"], elem_id=f"{kind}_files")
            c[f"{kind}_token"] = gr.Dropdown(TOKEN_SUGGESTIONS[kind], value=TOKEN_SUGGESTIONS[kind][0],
                                             allow_custom_value=True, label="Token",
                                             info="A rare word that will name the new concept in prompts.")
            nouns = noun_choices(kind, base.is_mini)
            c[f"{kind}_noun"] = gr.Dropdown(nouns, value=nouns[0] if kind == "style" else None,
                                            allow_custom_value=True,
                                            label="Class noun" if kind == "subject" else "What the images show",
                                            info="What the subject is (dog, mug)." if kind == "subject" else
                                            "Optional: the kind of thing pictured in the style images.")
            c[f"{kind}_use"] = gr.Button(f"Use these {kind} images", variant="primary")
        with gr.Column(scale=2):
            c[f"{kind}_gallery"] = gr.Gallery(label="Training views (cropped)", columns=5, height=260,
                                              format="png", object_fit="contain", elem_id=f"{kind}_gallery",
                                              fit_columns=False)
            c[f"{kind}_notes"] = gr.Markdown(elem_id=f"{kind}_notes")


def _train_tab(c: dict, base: BaseModel) -> None:
    with gr.Row():
        c["train_which"] = gr.Radio(["subject", "style", "both"], value="both", label="Train")
        c["method"] = gr.Radio([("DoRA", "dora"), ("LoRA", "lora")], value="dora", label="Adapter")
        c["quantize"] = gr.Radio([("none", "none"), ("8-bit", "int8"), ("4-bit NF4", "nf4")], value="none",
                                 label="QDoRA: quantized frozen base")
        c["int8"] = gr.Checkbox(label="Also save an INT8 adapter", value=False)
    with gr.Row():
        c["rank"] = gr.Slider(1, 64, value=8, step=1, label="Rank")
        c["steps"] = gr.Number(FLOW_STEPS, precision=0, minimum=1, maximum=100000, label="Steps", elem_id="steps")
        c["lr"] = gr.Number(TrainConfig.learning_rate, label="Learning rate")
        c["resolution"] = gr.Number(base.default_size, precision=0, minimum=64, maximum=2048, step=8,
                                    label="Resolution (px)")
        c["sample_every"] = gr.Number(50, precision=0, minimum=0, label="Preview every N steps (0: never)")
        c["prior"] = gr.Checkbox(label="Prior preservation (subject)", value=False)
    with gr.Row():
        c["train_btn"] = gr.Button("Train", variant="primary")
        c["resume_btn"] = gr.Button("Resume from checkpoint")
        c["train_cancel"] = gr.Button("Cancel", variant="stop")
    c["train_msg"] = gr.Markdown()
    with gr.Row():
        with gr.Column(scale=2):
            c["train_status"] = gr.Markdown("No training yet.", elem_id="train_status")
            with gr.Row():
                for kind in ("subject", "style"):
                    c[f"{kind}_plot"] = gr.LinePlot(x="step", y="loss", color="series", label=f"{kind.title()} loss",
                                                    height=240, color_map=SERIES_COLOURS)
        with gr.Column(scale=1):
            c["train_samples"] = gr.Gallery(label="Previews", columns=2, height=260, format="png")
            c["subject_dl"] = gr.DownloadButton("Download subject adapter", interactive=False)
            c["style_dl"] = gr.DownloadButton("Download style adapter", interactive=False)


def _merge_tab(c: dict) -> None:
    choices = [(MERGE_LABELS.get(m, m), m) for m in METHODS]
    with gr.Row():
        c["merge_method"] = gr.Dropdown(choices, value="zipq",
                                        label="Method", info="ZipQDoRA / ZipLoRA learn per-column mergers; "
                                                             "the others are training-free.")
        c["lam"] = gr.Number(0.01, label="λ (merger similarity penalty)")
        c["merge_steps"] = gr.Number(100, precision=0, minimum=1, maximum=1000, label="Steps", elem_id="merge_steps")
    with gr.Row():
        c["merge_subject_w"] = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Subject weight (direct/TIES/DARE)")
        c["merge_style_w"] = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Style weight (direct/TIES/DARE)")
        c["density"] = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Density (TIES/DARE)")
    with gr.Row():
        c["merge_btn"] = gr.Button("Merge", variant="primary")
        c["merge_cancel"] = gr.Button("Cancel", variant="stop")
        c["merged_dl"] = gr.DownloadButton("Download merged adapter", interactive=False)
    c["merge_msg"] = gr.Markdown()
    c["merge_status"] = gr.Markdown("No merge yet.", elem_id="merge_status")
    c["merge_plot"] = gr.LinePlot(x="step", y="loss", color="series", label="Merge loss", height=220,
                                  color_map=SERIES_COLOURS)


def _generate_tab(c: dict, base: BaseModel) -> None:
    size = base.default_size
    with gr.Row():
        with gr.Column(scale=1):
            c["prompt"] = gr.Textbox(Settings().prompt, label="Prompt", lines=2)
            c["negative"] = gr.Textbox("", label="Negative prompt")
            with gr.Row():
                c["subject_strength"] = gr.Slider(0, 1.5, value=Sliders.subject, step=0.05, label="Subject strength")
                c["style_strength"] = gr.Slider(0, 1.5, value=Sliders.style, step=0.05, label="Style strength")
                c["subject_detail"] = gr.Slider(
                    0, 1, value=Sliders.subject_detail, step=0.05, label="Subject in fine detail",
                    info="The subject's strength in the late steps, where texture is drawn: lower lets the style "
                         "show through (1 = constant, as the merged file gives in other tools).")
            with gr.Row():
                c["seed"] = gr.Number(0, precision=0, minimum=0, label="Seed", scale=3)
                c["dice"] = gr.Button("Random seed", scale=1)
            with gr.Row():
                c["gen_steps"] = gr.Slider(1, 100, value=20, step=1, label="Steps")
                c["guidance"] = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                c["handoff"] = gr.Slider(
                    0, 1, value=GenerateConfig.handoff, step=0.05, label="Hand-off (noise level)",
                    info="Where 'Subject in fine detail' takes over: 1 = from the first step, 0 = never; higher "
                         "gives the style more room, lower keeps more of the subject's shape.")
            with gr.Row():
                c["width"] = gr.Slider(64, 2048, value=size, step=8, label="Width")
                c["height"] = gr.Slider(64, 2048, value=size, step=8, label="Height")
                c["num_images"] = gr.Slider(1, 8, value=4, step=1, label="Images")
            c["candidates"] = gr.Slider(
                1, MAX_CANDIDATES, value=family_defaults(base.family).candidates, step=1, label="Candidates per image",
                info="Each image is the best of this many, picked by your own adapters (the one that each adapter "
                     "denoises better than the base model does). Every candidate costs a generation.")
            c["gen_btn"] = gr.Button("Generate", variant="primary")
        with gr.Column(scale=1):
            c["gen_gallery"] = gr.Gallery(label="Images (PNG)", columns=4, height=360, format="png",
                                          object_fit="contain", elem_id="gen_gallery")
            c["gen_note"] = gr.Markdown(elem_id="gen_note")
            c["gen_files"] = gr.File(label="Download PNGs", file_count="multiple", interactive=False)


def _compare_tab(c: dict, base: BaseModel) -> None:
    gr.Markdown("One prompt and seed through the base model, each adapter alone, the direct merge and the learned "
                "merge, one candidate per image (the columns compare the adapters, not the picking)."
                + (" Scores come from the offline evaluator (probability of the training subject/style and "
                   "feature similarity to the training images)." if base.is_mini else ""))
    with gr.Row():
        c["cmp_prompt"] = gr.Textbox(Settings().prompt, label="Prompt", scale=3)
        c["cmp_seed"] = gr.Number(0, precision=0, minimum=0, label="Seed", scale=1)
        c["cmp_steps"] = gr.Slider(1, 100, value=20, step=1, label="Steps", scale=1)
        c["cmp_n"] = gr.Slider(1, 4, value=2, step=1, label="Images per variant", scale=1)
    c["cmp_btn"] = gr.Button("Compare", variant="primary")
    c["cmp_gallery"] = gr.Gallery(label="Variants (one column each, one row per image)", columns=5, height="auto",
                                  format="png", object_fit="contain", fit_columns=False)
    c["cmp_scores"] = gr.Dataframe(label="Evaluator scores" if base.is_mini else "Variants", interactive=False,
                                   elem_id="cmp_scores")


def build_ui(base: BaseModel, secret: str | None = None) -> tuple[gr.Blocks, UI]:
    """The page: a header with the base model, one-click examples and flow, then the tabs of the flow."""
    c: dict[str, Any] = {}
    # Gradio's own copies of shown files (its cache) are dropped after a day, like the session folders.
    with gr.Blocks(title="ZipQDoRA Studio", delete_cache=(3600, 24 * 3600)) as demo:
        c["browser"] = gr.BrowserState(None, storage_key="zipq_session", secret=secret)
        c["session"] = gr.Textbox(visible=False, label="session")
        c["seen"] = gr.State(None)
        gr.Markdown(header_markdown(base))
        with gr.Row(equal_height=True):
            c["ex_subject"] = gr.Dropdown(example_names("subject"), value=DEFAULT_SUBJECT_EXAMPLE,
                                          label="Example subject", scale=1)
            c["ex_style"] = gr.Dropdown(example_names("style"), value=DEFAULT_STYLE_EXAMPLE, label="Example style",
                                        scale=1)
            c["ex_btn"] = gr.Button("Load examples", scale=1)
            c["flow_btn"] = gr.Button("▶ Run whole flow", variant="primary", scale=1)
            c["flow_cancel"] = gr.Button("Cancel all", variant="stop", scale=1)
        with gr.Row():
            c["flow_status"] = gr.Markdown(elem_id="flow_status")
            c["flow_gallery"] = gr.Gallery(label="Result", columns=4, height=160, format="png", object_fit="contain",
                                           visible=False, elem_id="flow_gallery")
        with gr.Tabs():
            with gr.Tab("Subject", id="subject"):
                _images_tab(c, "subject", base)
            with gr.Tab("Style", id="style"):
                _images_tab(c, "style", base)
            with gr.Tab("Train", id="train"):
                _train_tab(c, base)
            with gr.Tab("Merge", id="merge"):
                _merge_tab(c)
            with gr.Tab("Generate", id="generate"):
                _generate_tab(c, base)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(c, base)
        c["timer"] = gr.Timer(POLL_SECONDS)
    return demo, UI(c)


TRAIN_INPUTS = ("session", "train_which", "method", "quantize", "int8", "rank", "steps", "lr", "resolution",
                "prior", "sample_every")
GEN_INPUTS = ("session", "prompt", "negative", "seed", "gen_steps", "guidance", "width", "height", "num_images",
              "subject_strength", "style_strength", "subject_detail", "handoff", "candidates")
POLL_TARGETS = ("train_status", "subject_plot", "style_plot", "train_samples", "subject_dl", "style_dl",
                "merge_status", "merge_plot", "merged_dl", "flow_status", "flow_gallery", "seen")
EXAMPLE_TARGETS = ("subject_gallery", "subject_notes", "subject_token", "subject_noun", "style_gallery",
                   "style_notes", "style_token", "style_noun", "prompt")


def wire(demo: gr.Blocks, ui: UI, studio: Studio) -> None:
    """Connect events; the named ones (api_name) are the scripting API."""
    with demo:
        demo.load(studio.restore, ui("browser"), ui("session", "browser", "subject_gallery", "subject_notes",
                                                     "style_gallery", "style_notes", "subject_token", "subject_noun",
                                                     "style_token", "style_noun", "prompt", "seen"),
                  api_visibility="private")
        gr.api(studio.new_session, api_name="new_session")
        ui["timer"].tick(studio.poll, ui("session", "seen"), ui(*POLL_TARGETS), show_progress="hidden",
                         api_visibility="private", queue=False)
        for kind in ("subject", "style"):
            ui[f"{kind}_use"].click(
                getattr(studio, f"prepare_{kind}"), ui("session", f"{kind}_files", f"{kind}_token", f"{kind}_noun"),
                ui(f"{kind}_gallery", f"{kind}_notes", f"{kind}_noun", "prompt"), api_name=f"prepare_{kind}")
        words = ui("session", "subject_token", "subject_noun", "style_token", "style_noun")
        for name in ("subject_token", "subject_noun", "style_token", "style_noun"):
            ui[name].input(studio.remember_words, words, ui("prompt"), api_visibility="private",
                           show_progress="hidden")
        ui["ex_btn"].click(studio.load_examples, ui("session", "ex_subject", "ex_style"), ui(*EXAMPLE_TARGETS),
                           api_name="load_examples")
        ui["flow_btn"].click(studio.run_flow, ui("session", "ex_subject", "ex_style", "steps", "merge_method",
                                                 "merge_steps", "prompt", "seed"),
                             ui(*EXAMPLE_TARGETS, "flow_status"), api_name="run_flow")
        ui["flow_cancel"].click(lambda s: studio.cancel(s, "all"), ui("session"), ui("flow_status"),
                                api_visibility="private")
        ui["train_btn"].click(studio.train, ui(*TRAIN_INPUTS), ui("train_msg"), api_name="train")
        ui["resume_btn"].click(studio.resume, ui(*TRAIN_INPUTS), ui("train_msg"), api_name="resume")
        ui["train_cancel"].click(lambda s: studio.cancel(s, "train"), ui("session"), ui("train_msg"),
                                 api_visibility="private")
        gr.api(studio.cancel, api_name="cancel")
        ui["merge_btn"].click(studio.merge, ui("session", "merge_method", "lam", "merge_steps", "merge_subject_w",
                                               "merge_style_w", "density"), ui("merge_msg"), api_name="merge")
        ui["merge_cancel"].click(lambda s: studio.cancel(s, "merge"), ui("session"), ui("merge_msg"),
                                 api_visibility="private")
        ui["prompt"].change(lambda p: p, ui("prompt"), ui("cmp_prompt"), api_visibility="private",
                            show_progress="hidden")
        ui["dice"].click(lambda: random.randrange(2**31), None, ui("seed"), api_visibility="private",
                         show_progress="hidden")
        ui["gen_btn"].click(studio.generate, ui(*GEN_INPUTS), ui("gen_gallery", "gen_files", "gen_note"),
                            api_name="generate", concurrency_id="gpu", concurrency_limit=1)
        ui["cmp_btn"].click(studio.compare, ui("session", "cmp_prompt", "cmp_seed", "cmp_steps", "cmp_n"),
                            ui("cmp_gallery", "cmp_scores"), api_name="compare", concurrency_id="gpu",
                            concurrency_limit=1)
        gr.api(studio.job_status, api_name="job_status")


def create_app(base_spec: str = "mini", work_dir: str | Path = DEFAULT_WORK_DIR, device: str | None = None,
               ttl_hours: float = 24.0) -> tuple[gr.Blocks, Studio]:
    """Load the base model and build the app (nothing is loaded at import time).

    Args:
        base_spec: "mini", a hub id, a diffusers folder or a .safetensors file.
        work_dir: where the per-session folders live.
        device: "cpu", "cuda"; None picks CUDA when present.
        ttl_hours: sessions unused for longer are removed.

    Returns:
        (the Blocks app, the Studio behind it).
    """
    base = load_base(base_spec, device)
    registry = JobRegistry(root=Path(work_dir).resolve(), max_concurrent=1, ttl_s=ttl_hours * 3600)
    registry.cleanup()
    studio = Studio(base, registry)
    demo, ui = build_ui(base, browser_secret(registry.root))
    wire(demo, ui, studio)
    demo.queue(default_concurrency_limit=4)
    return demo, studio


def browser_secret(root: Path) -> str:
    """The key that encrypts the session id in the browser, kept beside the sessions folder so a restarted
    server still recognises its visitors (a fresh random key would send every open page to a new, empty
    session). It lives outside the folder that `allowed_paths` serves."""
    path = root.parent / f".{root.name}-browser-secret"
    if not path.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new_session_id())
    return path.read_text().strip()


def launch_kwargs(studio: Studio, **overrides) -> dict:
    """What `launch()` needs besides host/port: the theme, upload limit and the session folders to serve."""
    return {"theme": gr.themes.Soft(), "max_file_size": MAX_FILE_SIZE, "allowed_paths": [str(studio.registry.root)],
            "show_error": True, **overrides}


# ------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ZipQDoRA Studio: train, merge and generate in the browser.")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or
                   ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"), help="interface to listen on")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet access)")
    p.add_argument("--auth", default=None, help="user:password required to open the page")
    p.add_argument("--base", default="mini", help="mini (bundled), a hub id, a diffusers folder or a .safetensors")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="per-session folders live here")
    p.add_argument("--ttl-hours", type=float, default=24.0, help="remove sessions unused for this long")
    return p.parse_args(argv)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ZipqError("--auth must look like user:password.")
    return user, password


def check_share_possible(timeout: float = 3.0) -> None:
    """`--share` needs gradio's tunnel binary (downloaded on first use) and its server: fail fast when offline."""
    from gradio import tunneling

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ZipqError("--share needs internet access (HF_HUB_OFFLINE=1 is set): share the page another way, "
                        "e.g. --host 0.0.0.0 on your network, or run without --share.")
    hosts = [("api.gradio.app", 443)] + ([] if Path(tunneling.BINARY_PATH).exists() else
                                         [("cdn-media.huggingface.co", 443)])
    for host, port in hosts:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise ZipqError(f"--share needs internet access, but {host} cannot be reached ({e}). Gradio must "
                            "download its tunnel program and reach its share server; run without --share, or use "
                            "--host 0.0.0.0 to serve your local network.") from None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        auth = parse_auth(args.auth)
        if args.share:
            check_share_possible()
        demo, studio = create_app(args.base, args.work_dir, args.device, args.ttl_hours)
    except ZipqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                **launch_kwargs(studio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
