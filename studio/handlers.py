"""The page's event handlers: form values → studio.flow calls → what the components show.

Every handler turns a `ZipqError` into a message (`gr.Error`) and anything else into a short generic line (the
traceback goes to the server log only). Files reach the page only as copies published into Gradio's cache under a
name no one can guess (`publish`): the work folder itself is never served.
"""

from __future__ import annotations

import functools
import hashlib
import html
import inspect
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from zipq_core import plan
from zipq_core.base import BaseModel
from zipq_core.config import TOKEN_PATTERN, family_defaults
from zipq_core.data import ImageSet
from zipq_core.errors import ZipqError
from zipq_core.jobs import FINISHED, Job

from .flow import (
    KLORA_NO_DOWNLOAD,
    LOAD_KIND,
    NATIVE_FORMAT,
    GenerateForm,
    MergeForm,
    Stored,
    Studio,
    TrainForm,
    download_formats,
)
from .sessions import SessionPaths, Settings, merged_is_current

KLORA_LABEL = "K-LoRA: no merged file (download the subject and style adapters)"

log = logging.getLogger("zipq.studio")

POLL_SECONDS = 1.0
WAIT_SECONDS = 0.5  # how often a waiting generation handler looks at its job
GENERAL_NOUNS = ["dog", "cat", "person", "mug", "toy", "car", "plant"]
SERIES_COLOURS = {"subject": "#4f46e5", "subject (raw)": "#c7d2fe", "style": "#f97316", "style (raw)": "#fed7aa",
                  "merge": "#16a34a", "merge (raw)": "#bbf7d0"}


# -------------------------------------------------------------------------------------- errors → messages
def _message(e: Exception, name: str) -> gr.Error:
    if isinstance(e, ZipqError):
        # gr.Error renders HTML: escape the message and keep its line breaks (lists of skipped files).
        return gr.Error(html.escape(str(e)).replace("\n", "<br>"), title="Cannot do that", print_exception=False)
    log.exception("handler %s failed", name)
    return gr.Error(f"Something went wrong on the server ({type(e).__name__}). The details are in the server log; "
                    "try again, or reload the page.", print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Turn core errors into page messages, for plain handlers and for generator handlers alike."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise _message(e, fn.__name__) from None
        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise _message(e, fn.__name__) from None

    return wrapper


# ------------------------------------------------------------------------------------------- publishing
def publish(src: Path, name: str | None = None) -> str:
    """A copy of a session file in Gradio's cache, in a folder named by a hash of the file's path and time, so
    repeated polls reuse one copy; Gradio serves it from there and removes it with its cache (`delete_cache`)."""
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:32]
    dst = Path(get_upload_folder()) / f"zipq-{key}" / (name or src.name)
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return str(dst)


def drop_uploads(files) -> None:
    """Remove Gradio's temporary copies of uploads once the session has its own (they are not kept twice)."""
    root = Path(get_upload_folder()).resolve()
    for f in files or ():
        path = Path(f if isinstance(f, str) else f.name).resolve()
        if path.is_relative_to(root):
            path.unlink(missing_ok=True)


def client_address(request: gr.Request | None, trust_proxy: bool) -> str:
    """The visitor's address: the first X-Forwarded-For hop behind a trusted proxy (a Space), else the peer."""
    if request is None:
        return ""
    if trust_proxy:
        forwarded = (request.headers or {}).get("x-forwarded-for", "")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return getattr(request.client, "host", "") or ""


# ------------------------------------------------------------------------------------------- formatting
def job_line(snap: dict | None, name: str, resume_step: int | None = None) -> str:
    """One Markdown line about a job: status, step, loss, ETA, queue position and wait, or error."""
    if snap is None:
        return f"**{name}**: not started."
    head = f"**{name}** · {snap['status']}"
    if snap["status"] == "queued":
        wait = f", starts in about {plan.describe(snap['starts_in'])}" if snap["starts_in"] is not None else ""
        where = f"position {snap['position']} in the queue" if snap["starts_in"] is not None else \
            "waiting for the job before it"
        return f"{head} ({where}{wait}; it should take about {plan.describe(snap['estimate'])})"
    if snap["status"] == "failed":
        return f"{head}: {snap['error']}"
    parts = [head]
    if snap["total"]:
        parts.append(f"step {snap['step']}/{snap['total']}")
    if snap["loss"] is not None:
        parts.append(f"loss {snap['loss']:.4f}")
    if snap["status"] == "running" and snap["eta"] is not None:
        parts.append(f"ETA {plan.describe(snap['eta'])}")
    if snap["status"] in FINISHED and snap["started"] and snap["finished"]:
        parts.append(f"took {plan.describe(snap['finished'] - snap['started'])}")
    if snap["status"] in ("cancelled", "interrupted") and snap["error"]:
        parts.append(snap["error"])
    if snap["status"] in ("cancelled", "interrupted") and resume_step is not None:
        parts.append(f"**Resume from checkpoint** continues from step {resume_step}")
    return " · ".join(parts)


def queued(job: Job) -> str:
    """A queued job as the page announces it: its label, its time and its memory plan."""
    memory = f", {job.meta['memory']}" if job.meta.get("memory") else ""
    return f"{job.label} (about {plan.describe(job.estimate_s)}{memory})"


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with bias correction (TensorBoard's smoothing): the trend of a noisy loss."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_frame(job: Job | None, series: str):
    """A job's loss: the smoothed curve over the raw one (faint), for `gr.LinePlot`; `gr.skip()` while it has none.

    Gradio 6.31's plot draws nothing after it once received an empty table, and never draws a colour series that
    was absent from its first table: hence one plot per job kind, both series from the first point, no empty update.
    """
    import pandas as pd

    points = [(p.step, p.loss) for p in (list(job.progress) if job is not None else []) if math.isfinite(p.loss)]
    if not points:
        return gr.skip()
    steps, losses = zip(*points)
    rows = [{"step": s, "loss": v, "series": f"{series} (raw)"} for s, v in points]
    rows += [{"step": s, "loss": v, "series": series} for s, v in zip(steps, smoothed(list(losses)))]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64",
                                                                          "series": "str"})


def notes_markdown(image_set: ImageSet | None, error: str | None = None, ignored: list[str] = ()) -> str:
    """The data stage's summary (or refusal) as Markdown: counts, then one bullet per skipped file."""
    text = f"⚠️ {error}" if error else (image_set.summary() if image_set is not None else "")
    if ignored:
        text += "\n\nNot kept:\n" + "\n".join(f"- {line}" for line in ignored)
    return text.replace("\n- ", "\n\n- ")


def gallery_of(image_set: ImageSet | None) -> list[tuple]:
    """Training views labelled with the caption each one trains (a `.txt` sidecar's words included)."""
    return [] if image_set is None else [(t.image, f"{t.name}: {t.caption}") for t in image_set.images]


def noun_choices(kind: str, is_mini: bool, guess: str | None = None) -> list[str]:
    """Class-noun suggestions: the world's subjects on mini, everyday nouns elsewhere; a guess goes first."""
    if kind == "style":
        return ["", "picture", "shape", "painting", "illustration"]
    if is_mini:
        from zipq_mini import world

        choices = list(world.ALL_SUBJECTS)
    else:
        choices = list(GENERAL_NOUNS)
    return [guess] + [c for c in choices if c != guess] if guess else choices


def scores_table(rows: list[list], scored: bool):
    import pandas as pd

    if not scored:
        return pd.DataFrame({"variant": [r[0] for r in rows]})
    return pd.DataFrame(rows, columns=["variant", "subject prob", "subject sim", "style prob", "style sim",
                                       "prompt acc"])


# -------------------------------------------------------------------------------------------- handlers
class Handlers:
    """What the page's events call; the named ones are the scripting API (their parameters are pinned)."""

    def __init__(self, studio: Studio, trust_proxy: bool = False):
        self.studio = studio
        self.trust_proxy = trust_proxy

    @property
    def registry(self):
        return self.studio.registry

    # ---- sessions
    @user_errors
    def new_session(self, request: gr.Request = None) -> str:
        """A fresh session id, issued by the server (scripts pass it first to every endpoint)."""
        return self.studio.new_session(client_address(request, self.trust_proxy))

    @user_errors
    def restore(self, stored: str | None, request: gr.Request = None) -> tuple:
        """On page load: keep the browser's session (re-attaching to its jobs and files) or start one."""
        try:
            session = self.registry.check(stored)
        except ZipqError:
            session = self.new_session(request)
        s = self.studio.paths(session).read_settings()
        name = self.studio.base_name(session)
        if self.studio.bases.resident(self.studio.bases.spec(name)) is None:  # e.g. after a restart
            self.studio.submit_load(session, self.studio.bases.spec(name))
        base = self.studio.bases.resident(self.studio.bases.spec(name))
        noun = s.class_noun if base is None else gr.Dropdown(choices=noun_choices("subject", base.is_mini),
                                                             value=s.class_noun or None, allow_custom_value=True)
        return (session, session, *self._preview("subject", session), *self._preview("style", session),
                s.subject_token, noun, s.style_token, s.style_noun, s.prompt, None,
                *self._base_fields(session, name))

    @user_errors
    def fresh_session(self, request: gr.Request = None) -> tuple:
        """The 'New session' button: a new, empty session for this browser (the old one expires on its own)."""
        session = self.new_session(request)
        s = Settings()
        return (session, session, [], "", [], "", s.subject_token, s.class_noun, s.style_token, s.style_noun,
                s.prompt, None, *self._base_fields(session, self.studio.bases.default))

    # ---- base model
    @user_errors
    def choose_base(self, session: str, name: str) -> tuple:
        """Make one of the operator's base models the session's: the Train and Generate fields take its family's
        defaults; a base not loaded yet loads as a job (a hub download shows its progress)."""
        self.registry.check(session)
        self.studio.choose_base(session, name)
        base = self.studio.bases.resident(self.studio.bases.spec(name))
        nouns = gr.skip() if base is None else gr.Dropdown(choices=noun_choices("subject", base.is_mini),
                                                           allow_custom_value=True)
        return (*self._base_fields(session, name), nouns)

    def _base_fields(self, session: str, name: str) -> tuple:
        """The base dropdown, then the fields that follow the base: its line, the family defaults (subject and style
        steps, rank, learning rate and schedule, resolution, width, height, candidates) and the family note."""
        base = self.studio.bases.resident(self.studio.bases.spec(name))
        line = self._base_line(session, name, base)
        if base is None:  # the defaults arrive with the base (the poll redraws them once it is loaded)
            return (name, line, *(gr.skip() for _ in range(BASE_FIELDS - 2)))
        d = family_defaults(base.family)
        size = base.default_size
        return (name, line, d.steps, d.steps_for("style"), d.rank, d.learning_rate, d.lr_schedule, size, size, size,
                d.candidates, family_note(base))

    def _base_line(self, session: str, name: str, base: BaseModel | None) -> str:
        if base is not None:
            return describe_base(base, name)
        job = self.registry.latest(session, LOAD_KIND)
        return self._line(job, f"Loading {name}") if job is not None else f"**Base model:** {name} (not loaded)"

    def _preview(self, kind: str, session: str) -> tuple[list, str]:
        try:
            image_set = self.studio.stored_views(kind, session)
        except ZipqError as e:
            return [], notes_markdown(None, str(e))
        return gallery_of(image_set), notes_markdown(image_set) if image_set else ""

    # ---- data
    @user_errors
    def prepare_subject(self, session: str, files: list | None, token: str, class_noun: str) -> tuple:
        """Check and crop the subject uploads; show the training views and every skipped file's reason."""
        return self._prepare("subject", session, files, token, class_noun)

    @user_errors
    def prepare_style(self, session: str, files: list | None, token: str, noun: str) -> tuple:
        """The same for the style uploads."""
        return self._prepare("style", session, files, token, noun)

    def _prepare(self, kind: str, session: str, files, token: str, noun: str) -> tuple:
        """A refused upload is explained beside it (every skipped file with its reason) and in a toast; the earlier
        images stay."""
        self.registry.check(session)
        names = [f if isinstance(f, str) else f.name for f in files or ()]
        try:
            stored = self.studio.store_images(kind, session, names, token, noun)
        except ZipqError as e:
            gr.Warning(html.escape(str(e).splitlines()[0]), title=f"{kind.title()} images not usable")
            return [], notes_markdown(None, str(e)), gr.skip(), gr.skip()
        finally:
            drop_uploads(names)
        return self._stored(kind, session, stored)

    def _stored(self, kind: str, session: str, stored: Stored) -> tuple:
        noun_box = gr.Dropdown(choices=noun_choices(kind, self.studio._data_base(session).is_mini, stored.guess),
                               value=stored.settings.noun(kind))
        return gallery_of(stored.images), notes_markdown(stored.images, ignored=stored.ignored), noun_box, \
            stored.settings.prompt

    @user_errors
    def remember_words(self, session: str, subject_token: str, class_noun: str, style_token: str,
                       style_noun: str) -> str:
        """Keep the tokens with the session and refill the prompt from them."""
        return self.studio.remember_words(session, subject_token, class_noun, style_token, style_noun).prompt

    @user_errors
    def load_examples(self, session: str, subject_name: str, style_name: str) -> tuple:
        """Fill the Subject and Style tabs from the bundled examples."""
        return self._examples(*self.studio.load_examples(session, subject_name, style_name))

    def _examples(self, sub: Stored, sty: Stored) -> tuple:
        s = sty.settings
        return (gallery_of(sub.images), notes_markdown(sub.images), s.subject_token, s.class_noun,
                gallery_of(sty.images), notes_markdown(sty.images), s.style_token, s.style_noun, s.prompt)

    # ---- training and merging
    @user_errors
    def import_adapter(self, session: str, kind: str, files: list | None) -> str:
        """Use an existing LoRA/DoRA/LoHa/LoKr file (.safetensors, optionally with peft's adapter_config.json) as
        the session's subject or style adapter instead of training one."""
        self.registry.check(session)
        names = [f if isinstance(f, str) else f.name for f in files or ()]
        try:
            adapter = self.studio.import_adapter(session, kind, names)
        finally:
            drop_uploads(names)
        info = adapter.info
        return (f"Using {html.escape(str(info.get('source')))} ({html.escape(str(info.get('imported')))}, "
                f"{len(adapter.layers)} layers, rank {adapter.rank}) as the {kind} adapter: merge and generate with "
                "it as with a trained one.")

    @user_errors
    def train(self, session: str, which: str, method: str, quantize: str, int8: bool, rank: float, steps: float,
              style_steps: float, lr: float, lr_schedule: str, resolution: float, prior: bool,
              previews: float) -> str:
        """Queue training of the subject, the style or both (one after the other); returns at once."""
        form = TrainForm.parse(which, method, quantize, int8, rank, steps, style_steps, lr, lr_schedule, resolution,
                               prior, previews)
        jobs = self.studio.submit_training(session, form)
        return "Queued: " + ", ".join(queued(j) for j in jobs)

    @user_errors
    def resume(self, session: str, which: str, method: str, quantize: str, int8: bool, rank: float, steps: float,
               style_steps: float, lr: float, lr_schedule: str, resolution: float, prior: bool,
               previews: float) -> str:
        """Continue a cancelled or interrupted training from its newest checkpoint, with the settings it began
        with (the form's other fields are not used)."""
        jobs = self.studio.resume(session, which)
        return "Resuming with the settings it started with: " + ", ".join(j.label for j in jobs)

    @user_errors
    def cancel(self, session: str, what: str = "all") -> str:
        """Cancel the session's unfinished jobs whose kind starts with `what` (train, merge, generate or all)."""
        n = self.studio.cancel(session, what)
        return f"Cancelling {n} job(s); a running one stops after its current step." if n else "Nothing to cancel."

    @user_errors
    def merge(self, session: str, method: str, lam: float, steps: float, subject_weight: float,
              style_weight: float, density: float, keep_subject: float) -> str:
        """Queue a merge of the session's subject and style adapters; returns at once."""
        job = self.studio.submit_merge(session, MergeForm.parse(method, lam, steps, subject_weight, style_weight,
                                                                density, keep_subject))
        return f"Queued: {queued(job)}"

    # ---- generation
    @user_errors
    def generate(self, session: str, prompt: str, negative: str, seed: float, steps: float, guidance: float,
                 width: float, height: float, num_images: float, subject_strength: float, style_strength: float,
                 subject_detail: float = 1.0, handoff: float = 0.5, candidates: float = 1) -> Iterator[tuple]:
        """Generate with the merged adapter (or both adapters) at the slider strengths, as a job of the session:
        queued fairly, cancellable, stopped when the page goes away. Yields progress, then the images."""
        form = GenerateForm.parse(prompt, negative, seed, steps, guidance, width, height, num_images,
                                  subject_strength, style_strength, subject_detail, handoff, candidates)
        job = self.studio.submit_generate(session, form)
        yield from self._await(session, job, lambda: self._generation_outputs(session, job))

    def _await(self, session: str, job: Job, finish: Callable[[], tuple]) -> Iterator[tuple]:
        """Wait for a job while keeping the session alive; if the client goes away, the job is cancelled."""
        try:
            while job.status not in FINISHED:
                self.registry.touch(session)
                snap = self.registry.snapshot(job.id)
                yield gr.skip(), gr.skip(), job_line(snap, job.label.title())
                self.registry.wait(job.id, timeout=WAIT_SECONDS)
        except GeneratorExit:  # Gradio stopped asking: the visitor left
            self.registry.cancel(job.id, "Stopped: the page that asked for it went away.")
            raise
        if job.status == "failed":
            raise ZipqError(job.error or "The job failed.")
        if job.status != "done":
            raise ZipqError(job.error or f"The job was {job.status}.")
        yield finish()

    def _generation_outputs(self, session: str, job: Job) -> tuple:
        paths = self.studio.paths(session)
        files = [paths.file(rel) for name, rel in sorted(job.artifacts.items()) if name.startswith("image")]
        gallery = [(publish(f), f"seed {job.meta.get('seed')} · #{i + 1}") for i, f in enumerate(files)]
        done = job.log[-1] if job.log else f"{len(files)} image(s)."
        return gallery, [publish(f) for f in files], f"{done} Settings: {job.meta.get('note', '')}."

    @user_errors
    def compare(self, session: str, prompt: str, seed: float, steps: float, num_images: float) -> Iterator[tuple]:
        """Base, each adapter alone, the direct merge and the learned merge, one prompt and seed, with scores."""
        job = self.studio.submit_compare(session, prompt, seed, steps, num_images)
        yield from ((out[0], out[1]) for out in self._await(session, job, lambda: self._compare_outputs(session, job)))

    def _compare_outputs(self, session: str, job: Job) -> tuple:
        paths = self.studio.paths(session)
        names = job.meta["variants"]
        columns = [[(publish(paths.file(rel)), name) for key, rel in sorted(job.artifacts.items())
                    if key.startswith(f"cmp{v}-")] for v, name in enumerate(names)]
        grid = [cell for row in zip(*columns) for cell in row]  # row-major: one row per image, a column per variant
        return gr.Gallery(value=grid, columns=len(columns)), scores_table(job.meta["rows"],
                                                                          job.meta.get("base", "mini") == "mini")

    # ---- the whole flow
    @user_errors
    def run_flow(self, session: str, subject_name: str, style_name: str, steps: float, style_steps: float,
                 merge_method: str, merge_steps: float, prompt: str, seed: float) -> tuple:
        """Load the examples when a tab is empty, then queue: train subject → train style → merge → generate."""
        loaded, jobs, prompt = self.studio.run_flow(session, subject_name, style_name, steps, style_steps,
                                                    merge_method, merge_steps, prompt, seed)
        filled = self._examples(*loaded)[:-1] if loaded else tuple(gr.skip() for _ in range(8))
        status = "Queued the whole flow: " + " → ".join(j.label for j in jobs)
        return (*filled, prompt, status)

    # ---- polling
    @user_errors
    def job_status(self, session: str) -> dict:
        """Every job of the session as JSON (status, step, loss, ETA, queue position and wait, error, artifacts as
        names inside the session). Asking counts as the session's heartbeat."""
        self.registry.touch(session)
        return {"session": session, "jobs": [self.registry.snapshot(j.id) for j in self.registry.jobs_for(session)]}

    def poll(self, session: str, seen: Any, merge_method: str | None = None) -> tuple:
        """The Train, Merge, Generate and flow panels; skipped entirely when nothing changed since the last tick."""
        try:
            return self._poll(session, seen, merge_method)
        except ZipqError:  # no valid session yet (the page is still loading)
            return tuple(gr.skip() for _ in range(POLL_OUTPUTS))
        except Exception:  # a bug: log it, but do not pop up an error every second
            log.exception("poll failed")
            return tuple(gr.skip() for _ in range(POLL_OUTPUTS))

    def _poll(self, session: str, seen: Any, merge_method: str | None = None) -> tuple:
        self.registry.touch(session)
        paths = self.studio.paths(session)
        jobs = self.registry.jobs_for(session)
        s = paths.read_settings()
        name = self.studio.base_name(session)
        loaded = self.studio.bases.resident(self.studio.bases.spec(name)) is not None
        key = json.dumps([[j.id, j.version, j.status] for j in jobs] + [paths.has_adapter(k) for k in
                                                                        ("subject", "style", "merged")]
                         + [merge_method, s.formats, name, loaded])
        if key == seen:
            return tuple(gr.skip() for _ in range(POLL_OUTPUTS))
        base_fields = self._base_fields(session, name)[1:]
        if not (loaded and _base_state(seen) == [name, False]):  # the defaults follow a base only once it loaded
            base_fields = (base_fields[0], *(gr.skip() for _ in base_fields[1:]))
        return (*self._train_panel(session, paths), *self._merge_panel(session, paths, merge_method),
                *self._flow_panel(session, paths), *self._generate_panel(session), *base_fields, key)

    def _line(self, job: Job | None, name: str, kind: str | None = None) -> str:
        snap = self.registry.snapshot(job.id) if job is not None else None
        resume = self.studio.resumable_step(job.session, kind) if job is not None and kind else None
        return job_line(snap, name, resume)

    def _train_panel(self, session: str, paths: SessionPaths) -> tuple:
        sub, sty = self.registry.latest(session, "train-subject"), self.registry.latest(session, "train-style")
        lines = [self._line(sub, "Subject", "subject"), self._line(sty, "Style", "style")]
        logs = [f"- {line}" for job in (sub, sty) if job is not None for line in job.log[-4:]]
        samples = [(job.sample, f"{name} · step {job.latest.step if job.latest else 0}")
                   for name, job in (("subject", sub), ("style", sty)) if job is not None and job.sample is not None]
        return ("\n\n".join(lines + logs), loss_frame(sub, "subject"), loss_frame(sty, "style"), samples,
                self._download(session, paths, "subject"), self._download(session, paths, "style"))

    def _merge_panel(self, session: str, paths: SessionPaths, merge_method: str | None = None) -> tuple:
        job = self.registry.latest(session, "merge")
        line = self._line(job, "Merge")
        if paths.has_adapter("merged") and not merged_is_current(paths):
            line += "\n\n⚠️ The merged adapter was made from earlier adapters: merge again to use the new ones."
        return line, loss_frame(job, "merge"), self._download(session, paths, "merged", merge_method)

    def _flow_panel(self, session: str, paths: SessionPaths) -> tuple:
        mine = {j.id: j for j in self.registry.jobs_for(session)}
        jobs = [mine[i] for i in paths.read_settings().flow_jobs if i in mine]
        if not jobs:
            return "", gr.Gallery(value=[], visible=False)
        lines = [self._line(j, j.label[:1].upper() + j.label[1:]) for j in jobs]
        last = jobs[-1]
        images = [(publish(paths.file(rel)), "merged result") for k, rel in sorted(last.artifacts.items())
                  if k.startswith("image")]
        if last.status == "done":
            lines.append(f"✅ Whole flow done in {plan.describe(last.finished - jobs[0].created)}.")
        return "\n\n".join(lines), gr.Gallery(value=images, visible=bool(images))

    def _generate_panel(self, session: str) -> tuple:
        job = self.registry.latest(session, "generate")
        return (self._line(job, "Generation") if job is not None else gr.skip(),)

    def _download(self, session: str, paths: SessionPaths, kind: str, merge_method: str | None = None):
        """A download button for an adapter in the session's chosen format once it exists (disabled before, or
        while an export runs, its label saying so); K-LoRA, which has no merged file, says that instead."""
        label = f"Download {kind} adapter"
        if kind == "merged" and merge_method == "klora":
            return gr.DownloadButton(KLORA_LABEL, value=None, interactive=False)
        if not paths.has_adapter(kind):
            return gr.DownloadButton(label, value=None, interactive=False)
        fmt = paths.read_settings().formats.get("merged" if kind == "merged" else "train", NATIVE_FORMAT)
        try:
            got = self.studio.download(session, kind, fmt)
        except ZipqError as e:
            return gr.DownloadButton(str(e).splitlines()[0], value=None, interactive=False)
        if isinstance(got, str):
            return gr.DownloadButton(got, value=None, interactive=False)
        folder = paths.merged if kind == "merged" else paths.adapter(kind)
        info = json.loads((folder / "adapter.json").read_text()) if (folder / "adapter.json").exists() else {}
        name = str(info.get("token") or info.get("method") or "adapter")
        name = name if TOKEN_PATTERN.fullmatch(name) else "adapter"
        suffix = "" if fmt == NATIVE_FORMAT else f"-{fmt}"
        return gr.DownloadButton(label if fmt == NATIVE_FORMAT else f"{label} ({fmt})", interactive=True,
                                 value=publish(got, f"zipq-{kind}-{name}{suffix}.safetensors"))

    # ---- download formats
    @user_errors
    def train_format(self, session: str, fmt: str) -> tuple:
        """The format the subject and style adapters download in (exported on first use; a job on a large base)."""
        paths = self._set_format(session, "train", fmt)
        return self._download(session, paths, "subject"), self._download(session, paths, "style")

    @user_errors
    def merged_format(self, session: str, fmt: str, merge_method: str = "zipq") -> Any:
        """The format the merged adapter downloads in."""
        paths = self._set_format(session, "merged", fmt)
        return self._download(session, paths, "merged", merge_method)

    def merge_method_note(self, session: str, merge_method: str) -> tuple:
        """K-LoRA has no merged file: the Merge tab says so in place of the download."""
        try:
            paths = self.studio.paths(session)
        except ZipqError:
            return gr.skip(), gr.skip()
        note = KLORA_NO_DOWNLOAD if merge_method == "klora" else ""
        return self._download(session, paths, "merged", merge_method), note

    def _set_format(self, session: str, where: str, fmt: str) -> SessionPaths:
        if fmt != NATIVE_FORMAT and fmt not in download_formats():
            raise ZipqError(f"Unknown download format {fmt!r}: choose one of {NATIVE_FORMAT}, "
                            f"{', '.join(download_formats())}.")
        paths = self.studio.paths(session)
        s = paths.read_settings()
        paths.write_settings(replace(s, formats={**s.formats, where: fmt}))
        return paths


BASE_FIELDS = 12  # the base dropdown, its line, 9 defaults, the family note
# train: status, 2 plots, samples, 2 downloads · merge: 3 · flow: 2 · generate: 1 · the base fields but the
# dropdown · key
POLL_OUTPUTS = 6 + 3 + 2 + 1 + (BASE_FIELDS - 1) + 1


def _base_state(seen: Any) -> list | None:
    """The [base name, loaded] a poll key ended with (None before the first poll)."""
    try:
        return json.loads(seen)[-3:-1]
    except (TypeError, ValueError, IndexError):
        return None


def describe_base(base: BaseModel, name: str) -> str:
    """The base model's line: its name in the operator's list (never a server path), architecture, device, dtype."""
    return f"**Base model:** `{base.describe().replace(base.spec, name)}`"


def family_note(base: BaseModel) -> str:
    """The Train tab's note under the family-defaults table."""
    return f"Defaults per base family (this base: **{base.family}**):"

