"""A job registry for long work (training, merging) that lives apart from the request that started it.

The app submits a job and returns at once; the page then polls `get(job_id)` / `jobs_for(session)`, so a
reload, a second tab or a dropped connection re-attaches to the same job. Each job runs in its own worker
thread, but a FIFO admission queue lets at most `max_concurrent` heavy jobs run at a time (one by default:
two trainings side by side on one GPU or CPU are each slower than one after the other, DESIGN §9), and a
queued job knows its position.

A job's function receives a `JobContext` (cancel event, work folder, log, artifacts) and may return an
iterable of step records; any record with `step`/`total`/`loss`/`eta` attributes (the core's `TrainStep` and
`MergeStep`) becomes progress, a `sample` image becomes the latest preview, `messages` become log lines,
`adapter_dir` becomes the "adapter" artifact and `cancelled=True` marks the job cancelled.

Each visitor (session) has a work folder `<root>/<session>/`; `cleanup()` removes folders unused for longer
than the time-to-live, along with their finished jobs. This module never imports gradio.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ZipqError

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled"})
DEFAULT_ROOT = Path("runs") / "sessions"
DEFAULT_TTL_S = 24 * 3600.0
MAX_LOG_LINES = 500
MARKER = ".last_used"  # its mtime says when a session last did something
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")  # full match: also keeps ids from walking out of the root


def inside(root: Path, *parts: str) -> Path:
    """`root / parts…`, resolved, refused unless it lies inside `root` (no '..', absolute parts or links out)."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and not path.is_relative_to(root):
        raise ZipqError("That name would write outside your work folder: use letters, digits, '_' and '-'.")
    return path


def new_session_id() -> str:
    """A fresh, unguessable session id (also the name of the session's work folder)."""
    return uuid.uuid4().hex


def check_session_id(session: str) -> str:
    """Refuse ids that could name another folder ('..', slashes) or are empty."""
    if not isinstance(session, str) or not _SESSION_RE.fullmatch(session):
        raise ZipqError("This page has no valid session: reload the page to start a new one.")
    return session


@dataclass
class Progress:
    """One progress point of a job."""

    step: int
    total: int
    loss: float
    eta: float
    elapsed: float


@dataclass
class JobContext:
    """What a job's function gets: a cancel flag to honour between steps, a folder and two reporters."""

    job: Job
    cancel: threading.Event
    work_dir: Path

    def log(self, line: str) -> None:
        self.job.add_log(line)

    def artifact(self, name: str, path: str | Path) -> None:
        self.job.set_artifact(name, Path(path))


JobFn = Callable[[JobContext], Iterable[Any] | None]


@dataclass
class Job:
    """A job's record: everything the page shows about it. Mutated only by its worker, under `lock`."""

    id: str
    session: str
    kind: str
    label: str
    after: tuple[str, ...] = ()
    status: Status = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: list[Progress] = field(default_factory=list)
    sample: Any = None  # the latest preview image (PIL), if the job makes them
    log: list[str] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    version: int = 0  # bumped on every change, so a poller can skip redrawing an unchanged job
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def finished_ok(self) -> bool:
        return self.status == "done"

    @property
    def latest(self) -> Progress | None:
        return self.progress[-1] if self.progress else None

    def add_log(self, line: str) -> None:
        with self.lock:
            self.log.append(line)
            del self.log[:-MAX_LOG_LINES]
            self.version += 1

    def set_artifact(self, name: str, path: Path) -> None:
        with self.lock:
            self.artifacts[name] = path
            self.version += 1

    def set_status(self, status: Status, error: str | None = None) -> None:
        with self.lock:
            self.status = status
            if status == "running":
                self.started = time.time()
            if status in FINISHED:
                self.finished = time.time()
            if error:
                self.error = error
            self.version += 1

    def record(self, rec: Any) -> None:
        """Take what a step record carries (duck-typed: TrainStep, MergeStep or anything alike)."""
        with self.lock:
            if hasattr(rec, "step") and hasattr(rec, "total"):
                loss = getattr(rec, "loss", float("nan"))
                self.progress.append(Progress(int(rec.step), int(rec.total), float(loss),
                                              float(getattr(rec, "eta", float("nan"))),
                                              float(getattr(rec, "elapsed", 0.0))))
            if getattr(rec, "sample", None) is not None:
                self.sample = rec.sample
            self.log.extend(str(m) for m in getattr(rec, "messages", None) or [])
            del self.log[:-MAX_LOG_LINES]
            if getattr(rec, "adapter_dir", None):
                self.artifacts["adapter"] = Path(rec.adapter_dir)
            self.version += 1

    def snapshot(self, position: int = 0) -> dict:
        """A JSON-able view (what the API's job-status endpoint returns); `position` 1 = next to run."""
        with self.lock:
            last = self.latest
            return {"id": self.id, "session": self.session, "kind": self.kind, "label": self.label,
                    "status": self.status, "position": position, "error": self.error,
                    "step": last.step if last else 0, "total": last.total if last else 0,
                    "loss": _finite(last.loss) if last else None, "eta": _finite(last.eta) if last else None,
                    "elapsed": last.elapsed if last else 0.0,
                    "losses": [[p.step, p.loss] for p in self.progress if math.isfinite(p.loss)],
                    "log": list(self.log[-20:]), "artifacts": {k: str(v) for k, v in self.artifacts.items()},
                    "created": self.created, "started": self.started, "finished": self.finished,
                    "version": self.version}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class JobRegistry:
    """Job id → worker thread, status, progress, log, artifacts; plus the per-session work folders.

    Args:
        root: folder holding one work folder per session.
        max_concurrent: heavy jobs allowed to run at once (others wait in FIFO order).
        ttl_s: a session folder unused for longer than this is removed by `cleanup()`.
        max_pending_per_session: a quota, so one visitor cannot fill the queue.
    """

    def __init__(self, root: str | Path = DEFAULT_ROOT, max_concurrent: int = 1, ttl_s: float = DEFAULT_TTL_S,
                 max_pending_per_session: int = 8):
        if max_concurrent < 1:
            raise ZipqError("max_concurrent must be at least 1.")
        self.root = Path(root)
        self.max_concurrent = max_concurrent
        self.ttl_s = ttl_s
        self.max_pending_per_session = max_pending_per_session
        self._jobs: dict[str, Job] = {}
        self._waiting: list[str] = []  # FIFO of queued job ids
        self._running = 0
        self._cond = threading.Condition()

    # ------------------------------------------------------------------------------------------ sessions
    def session_dir(self, session: str) -> Path:
        """The session's work folder (created, and marked as used now)."""
        path = self.root / check_session_id(session)
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).touch()
        return path

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove session folders (and their finished jobs) unused for longer than the TTL.

        A session with a queued or running job is never removed. Returns the removed session ids.
        """
        now = time.time() if now is None else now
        removed = []
        if not self.root.exists():
            return removed
        busy = {j.session for j in self._all() if j.status not in FINISHED}
        for path in self.root.iterdir():
            if not path.is_dir() or path.name in busy:
                continue
            if now - _last_used(path) > self.ttl_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        with self._cond:
            for job_id in [j.id for j in self._jobs.values() if j.session in removed]:
                del self._jobs[job_id]
        return removed

    # ---------------------------------------------------------------------------------------------- jobs
    def submit(self, session: str, kind: str, fn: JobFn, label: str = "", after: Sequence[str] = ()) -> Job:
        """Queue `fn` as a job of `session` and start its worker; returns at once.

        Args:
            session: the visitor's session id.
            kind: what the job is ("train-subject", "merge" …); the page finds jobs by kind.
            fn: called with a `JobContext`; may return an iterable of step records (a generator).
            label: a short description for the page.
            after: ids of jobs that must finish successfully first (else this one is cancelled).
        """
        work_dir = self.session_dir(session)
        pending = [j for j in self.jobs_for(session) if j.status not in FINISHED]
        if len(pending) >= self.max_pending_per_session:
            raise ZipqError(f"You already have {len(pending)} jobs waiting or running: wait for one to finish "
                            "or cancel it.")
        job = Job(id=uuid.uuid4().hex[:12], session=session, kind=kind, label=label or kind, after=tuple(after))
        with self._cond:
            unknown = [a for a in job.after if a not in self._jobs]
            if unknown:
                raise ZipqError(f"Unknown job(s) to wait for: {', '.join(unknown)}.")
            self._jobs[job.id] = job
            self._waiting.append(job.id)
        ctx = JobContext(job=job, cancel=job.cancel_event, work_dir=work_dir)
        threading.Thread(target=self._worker, args=(job, fn, ctx), name=f"job-{kind}-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            raise ZipqError(f"No job {job_id!r}: it finished long ago and was cleaned up, or never existed.")
        return job

    def position(self, job_id: str) -> int:
        """1 for the next queued job to run, 2 for the one after …; 0 when not waiting."""
        with self._cond:
            return self._waiting.index(job_id) + 1 if job_id in self._waiting else 0

    def snapshot(self, job_id: str) -> dict:
        return self.get(job_id).snapshot(self.position(job_id))

    def jobs_for(self, session: str, kind: str | None = None) -> list[Job]:
        """The session's jobs, oldest first (optionally of one kind)."""
        return [j for j in self._all() if j.session == session and (kind is None or j.kind == kind)]

    def running(self) -> list[Job]:
        """Jobs running now, any session's (a request that needs the model waits for them)."""
        return [j for j in self._all() if j.status == "running"]

    def latest(self, session: str, kind: str) -> Job | None:
        found = self.jobs_for(session, kind)
        return found[-1] if found else None

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one never starts; a running one stops at its next step (it saves what it has)."""
        job = self.get(job_id)
        job.cancel_event.set()
        with self._cond:
            if job.status == "queued" and job_id in self._waiting:
                self._waiting.remove(job_id)
                job.set_status("cancelled", "Cancelled before it started.")
                self._cond.notify_all()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has finished (for scripts and tests)."""
        job = self.get(job_id)
        deadline = None if timeout is None else time.time() + timeout
        with self._cond:
            while job.status not in FINISHED:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    break
                self._cond.wait(timeout=left if left is not None else 1.0)
        return job

    # ----------------------------------------------------------------------------------------- internals
    def _all(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    def _blocked_by(self, job: Job) -> tuple[bool, str | None]:
        """(still waiting on a dependency, the reason to give up when a dependency did not succeed)."""
        for dep_id in job.after:
            dep = self._jobs[dep_id]
            if dep.status in ("failed", "cancelled"):
                return False, f"Skipped: '{dep.label}' {dep.status} before it."
            if dep.status != "done":
                return True, None
        return False, None

    def _admit(self, job: Job) -> bool:
        """Wait for a free slot in FIFO order (dependencies respected); False if cancelled or skipped meanwhile."""
        with self._cond:
            while True:
                if job.id not in self._waiting:  # cancelled while queued
                    return False
                blocked, give_up = self._blocked_by(job)
                if give_up:
                    self._waiting.remove(job.id)
                    job.set_status("cancelled", give_up)
                    self._cond.notify_all()
                    return False
                ready = [i for i in self._waiting if not self._blocked_by(self._jobs[i])[0]]
                if not blocked and self._running < self.max_concurrent and ready and ready[0] == job.id:
                    self._waiting.remove(job.id)
                    self._running += 1
                    job.set_status("running")
                    return True
                self._cond.wait(timeout=1.0)

    def _worker(self, job: Job, fn: JobFn, ctx: JobContext) -> None:
        if not self._admit(job):
            return
        status: Status = "done"
        error = None
        try:
            for rec in fn(ctx) or ():
                job.record(rec)
                if getattr(rec, "cancelled", False):
                    status, error = "cancelled", "Cancelled: what was trained so far is saved."
        except ZipqError as e:
            status, error = "failed", str(e)
        except Exception as e:  # a bug, not the user's fault: keep the traceback in the server log only
            log.exception("job %s (%s) crashed", job.id, job.kind)
            status, error = "failed", f"Internal error ({type(e).__name__}); the details are in the server log."
        if status == "done" and job.cancel_event.is_set() and not job.artifacts:
            status, error = "cancelled", "Cancelled."
        if ctx.work_dir.exists():  # finishing counts as use: the TTL starts from the end of the last job
            (ctx.work_dir / MARKER).touch()
        with self._cond:
            self._running -= 1
            job.set_status(status, error)
            self._cond.notify_all()


def _last_used(path: Path) -> float:
    marker = path / MARKER
    return marker.stat().st_mtime if marker.exists() else path.stat().st_mtime
