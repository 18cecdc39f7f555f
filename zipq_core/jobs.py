"""A job registry for long work (training, merging, generating) that lives apart from the request that started it,
fair to every visitor of a public page and persisted across restarts.

- Sessions: a visitor's id is an unguessable secret issued here (128 random bits and an HMAC of them under the
  server's key): a client-chosen or altered id is refused everywhere. Each session has a work folder
  `<root>/<id>/`; `cleanup()` removes sessions unused for longer than the time-to-live.
- Jobs: `submit()` returns at once; the page polls `snapshot()`, so a reload or a second tab re-attaches. At most
  `max_concurrent` jobs run at a time. The next job to run is the waiting one whose session started a job least
  recently (then the oldest): a visitor who queues many jobs gets one turn per round, not the whole queue.
- Budgets: a job carries an estimate and a budget in device-seconds (zipq_core.plan); the caller refuses a request
  whose estimate exceeds the budget, and the watchdog stops a running job that passes its budget while others wait
  (or twice its budget in any case): the job stops as if cancelled, keeping what it made (a training's checkpoint).
- Heartbeats: a page polls; a session that nobody has asked about for `heartbeat_s` has its jobs cancelled the
  same way (a closed tab does not hold the model).
- Persistence: jobs and sessions live in `<root>/jobs.sqlite`. After a restart, finished jobs show as finished,
  running ones as "interrupted" (their checkpoints are on disk) and queued ones as cancelled.

A job's function receives a `JobContext` and may return an iterable of `progress.Step` records (the core's train
and merge generators): they become progress, previews, log lines and the "adapter" artifact. This module never
imports gradio or torch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import Cancelled, ZipqError
from .progress import Step

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled", "interrupted"})
DEFAULT_ROOT = Path("runs") / "sessions"
MAX_LOG_LINES = 500
MAX_STORED_POINTS = 400  # loss-curve points kept per job in the store
MARKER = ".last_used"  # its mtime says when a session last did something
STORE_NAME = "jobs.sqlite"
SESSION_PATTERN = re.compile(r"[0-9a-f]{64}")  # 32 hex of randomness, 32 hex of HMAC
SESSION_MESSAGE = "This page has no valid session: reload the page to start a new one."


# ------------------------------------------------------------------------------------------------ paths
def inside(root: Path, *parts: str) -> Path:
    """`root / parts…`, resolved, refused unless it lies inside `root` (no '..', absolute parts or links out)."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and not path.is_relative_to(root):
        raise ZipqError("That name would write outside your work folder: use letters, digits, '_' and '-'.")
    return path


def folder_usage(folder: Path) -> tuple[int, int]:
    """(bytes, files) under a folder (0, 0 when it does not exist)."""
    total = count = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(dirpath) / name).stat().st_size
                count += 1
            except OSError:  # removed meanwhile
                pass
    return total, count


# --------------------------------------------------------------------------------------------- sessions
def load_secret(path: Path) -> bytes:
    """The server's session key, created once (owner-only permissions) and kept across restarts."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


class SessionKeys:
    """Issues and checks session ids: 128 random bits followed by their HMAC-SHA256 under the server's key."""

    def __init__(self, secret: bytes):
        self._secret = secret

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()[:32]

    def new(self) -> str:
        nonce = secrets.token_hex(16)
        return nonce + self._mac(nonce)

    def browser_secret(self) -> str:
        """A key derived from the server's, for encrypting the copy of the id a browser keeps (gr.BrowserState)."""
        return hmac.new(self._secret, b"browser-state", hashlib.sha256).hexdigest()

    def check(self, session: object) -> str:
        """The id when the server issued it; `ZipqError` for anything else (forged, chosen, altered, padded)."""
        if not isinstance(session, str) or SESSION_PATTERN.fullmatch(session) is None:
            raise ZipqError(SESSION_MESSAGE)
        if not hmac.compare_digest(self._mac(session[:32]), session[32:]):
            raise ZipqError(SESSION_MESSAGE)
        return session


@dataclass(frozen=True)
class Limits:
    """What one visitor, and all of them together, may hold (a public Space's operator sets these at launch)."""

    max_concurrent: int = 1  # heavy jobs running at once (two trainings side by side are each slower)
    max_pending_per_session: int = 8  # the whole flow queues four
    max_queued: int = 64  # jobs waiting or running, all sessions together
    sessions_per_address: int = 8  # live sessions one client address may hold
    max_sessions: int = 2000  # live sessions in all
    heartbeat_s: float = 180.0  # a session nobody polled for this long has its jobs cancelled
    ttl_s: float = 24 * 3600.0  # a session unused for this long is removed, files and jobs

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ZipqError("max_concurrent must be at least 1.")
        if not (self.heartbeat_s > 0 and self.ttl_s > 0):
            raise ZipqError("the heartbeat and the time-to-live must be positive.")


# ------------------------------------------------------------------------------------------------- jobs
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
    """What a job's function gets: a cancel flag to honour between steps, its session's folder and reporters."""

    job: Job
    cancel: threading.Event
    work_dir: Path

    def log(self, line: str) -> None:
        self.job.add_log(line)

    def artifact(self, name: str, path: str | Path) -> None:
        self.job.set_artifact(name, Path(path), self.work_dir)

    def progress(self, done: int, total: int) -> None:
        """Progress of a stage that is not a generator (generation reports through a callback)."""
        elapsed = time.time() - (self.job.started or time.time())
        eta = elapsed / done * (total - done) if done else math.nan
        self.job.record(Step(done, total, elapsed=elapsed, eta=eta))


JobFn = Callable[[JobContext], Iterable[Any] | None]


@dataclass
class Job:
    """A job's record: everything the page shows about it. Mutated by its worker and the watchdog, under `lock`."""

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
    sample: Any = None  # the latest preview image (PIL), if the job makes them (not persisted)
    log: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # name → path relative to the session folder
    error: str | None = None
    estimate_s: float = 0.0  # what zipq_core.plan expected it to cost
    budget_s: float = math.inf  # the watchdog stops it past this while others wait
    meta: dict = field(default_factory=dict)  # what the caller wants back after a restart (JSON-able)
    version: int = 0  # bumped on every change, so a poller can skip redrawing an unchanged job
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    cancel_reason: str | None = field(default=None, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def latest(self) -> Progress | None:
        return self.progress[-1] if self.progress else None

    def add_log(self, line: str) -> None:
        with self.lock:
            self.log.append(line)
            del self.log[:-MAX_LOG_LINES]
            self.version += 1

    def set_artifact(self, name: str, path: Path, session_dir: Path) -> None:
        resolved = path.resolve()
        root = session_dir.resolve()
        relative = str(resolved.relative_to(root)) if resolved.is_relative_to(root) else resolved.name
        with self.lock:
            self.artifacts[name] = relative
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
        """Take what a step record (`progress.Step` or a subclass) carries."""
        if not isinstance(rec, Step):
            return
        with self.lock:
            self.progress.append(Progress(rec.step, rec.total, float(rec.loss), float(rec.eta), float(rec.elapsed)))
            if rec.sample is not None:
                self.sample = rec.sample
            self.log.extend(str(m) for m in rec.messages)
            del self.log[:-MAX_LOG_LINES]
            self.version += 1

    def remaining_s(self, now: float) -> float:
        """Seconds this job still needs: its own pace once it has some, else what was estimated."""
        if self.status in FINISHED:
            return 0.0
        last = self.latest
        if self.status == "running" and last is not None and math.isfinite(last.eta):
            return last.eta
        spent = now - self.started if self.status == "running" and self.started else 0.0
        return max(0.0, self.estimate_s - spent)

    def snapshot(self, position: int = 0, wait_s: float | None = None) -> dict:
        """A JSON-able view (what the API's job-status endpoint returns). No server paths: artifacts are names
        relative to the session's folder. `position` 1 = next to run; `wait_s` = estimated seconds until it starts."""
        with self.lock:
            last = self.latest
            return {"id": self.id, "kind": self.kind, "label": self.label, "status": self.status,
                    "position": position, "starts_in": _finite(wait_s) if wait_s is not None else None,
                    "error": self.error, "step": last.step if last else 0, "total": last.total if last else 0,
                    "loss": _finite(last.loss) if last else None, "eta": _finite(last.eta) if last else None,
                    "elapsed": last.elapsed if last else 0.0, "estimate": round(self.estimate_s, 1),
                    "budget": _finite(self.budget_s),
                    "losses": [[p.step, p.loss] for p in self.progress if math.isfinite(p.loss)],
                    "log": list(self.log[-20:]), "artifacts": dict(self.artifacts), "meta": dict(self.meta),
                    "created": self.created, "started": self.started, "finished": self.finished,
                    "version": self.version}


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------ store
class JobStore:
    """Jobs and sessions in one SQLite file, so a restarted server knows what happened before."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, session TEXT, data TEXT)")
            self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, address TEXT, created REAL)")

    def save_job(self, job: Job) -> None:
        with job.lock:
            points = job.progress[-MAX_STORED_POINTS:]
            data = {"kind": job.kind, "label": job.label, "after": list(job.after), "status": job.status,
                    "created": job.created, "started": job.started, "finished": job.finished,
                    "progress": [[p.step, p.total, p.loss, p.eta, p.elapsed] for p in points],
                    "log": job.log[-50:], "artifacts": job.artifacts, "error": job.error,
                    "estimate_s": job.estimate_s, "budget_s": None if math.isinf(job.budget_s) else job.budget_s,
                    "meta": job.meta}
        text = json.dumps(data, allow_nan=True)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO jobs (id, session, data) VALUES (?, ?, ?)",
                             (job.id, job.session, text))

    def load_jobs(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT id, session, data FROM jobs").fetchall()
        jobs = []
        for job_id, session, text in rows:
            d = json.loads(text)
            job = Job(id=job_id, session=session, kind=d["kind"], label=d["label"], after=tuple(d["after"]),
                      status=d["status"], created=d["created"], started=d["started"], finished=d["finished"],
                      progress=[Progress(*p) for p in d["progress"]], log=d["log"], artifacts=d["artifacts"],
                      error=d["error"], estimate_s=d["estimate_s"],
                      budget_s=math.inf if d["budget_s"] is None else d["budget_s"], meta=d.get("meta") or {})
            jobs.append(job)
        return sorted(jobs, key=lambda j: j.created)

    def add_session(self, session: str, address: str, created: float) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO sessions (id, address, created) VALUES (?, ?, ?)",
                             (session, address, created))

    def load_sessions(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT id, address FROM sessions").fetchall())

    def forget(self, sessions: Sequence[str]) -> None:
        with self._lock:
            for s in sessions:
                self._db.execute("DELETE FROM jobs WHERE session = ?", (s,))
                self._db.execute("DELETE FROM sessions WHERE id = ?", (s,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------------------------- registry
class JobRegistry:
    """Sessions and their jobs: admission, fairness, budgets, heartbeats, persistence, clean-up.

    Args:
        root: folder holding one work folder per session (and the store).
        limits: caps and timings (`Limits`).
        secret: the session key; default: kept in `<root's parent>/.<root name>-secret`, outside the served tree.
        persist: keep jobs and sessions in `<root>/jobs.sqlite` (and restore them on start).
        watchdog_s: how often budgets and heartbeats are checked (0: never, for tests that drive `check_now`).
    """

    def __init__(self, root: str | Path = DEFAULT_ROOT, limits: Limits = Limits(), secret: bytes | None = None,
                 persist: bool = True, watchdog_s: float = 0.5):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.keys = SessionKeys(secret if secret is not None else
                                load_secret(self.root.parent / f".{self.root.name}-secret"))
        self._jobs: dict[str, Job] = {}
        self._waiting: list[str] = []  # queued job ids (the fair order is computed from it)
        self._running = 0
        self._cond = threading.Condition()
        self._last_start: dict[str, float] = {}  # session → when it last had a job started
        self._heartbeat: dict[str, float] = {}  # session → last time a page or client asked about it
        self._addresses: dict[str, str] = {}  # session → the client address that opened it
        self._saved_at: dict[str, float] = {}
        self._store = JobStore(self.root / STORE_NAME) if persist else None
        if self._store is not None:
            self._restore()
        self._stop = threading.Event()
        if watchdog_s > 0:
            threading.Thread(target=self._watch, args=(watchdog_s,), name="job-watchdog", daemon=True).start()

    # ------------------------------------------------------------------------------------------ sessions
    def new_session(self, address: str = "") -> str:
        """Issue a session id for a client address (refused past the per-address and global caps)."""
        now = time.time()
        if len(self._addresses) >= self.limits.max_sessions:
            self.cleanup(now)  # expired sessions make room
        with self._cond:
            if len(self._addresses) >= self.limits.max_sessions:
                raise ZipqError("The studio has as many visitors as it can hold right now: try again later.")
            mine = [s for s, a in self._addresses.items() if a == address]
            if address and len(mine) >= self.limits.sessions_per_address:
                raise ZipqError(f"You already have {len(mine)} sessions open: keep working in one of them (reload "
                                "an open page), or wait until an unused one expires.")
            session = self.keys.new()
            self._addresses[session] = address
            self._heartbeat[session] = now
        if self._store is not None:
            self._store.add_session(session, address, now)
        self.session_dir(session)
        return session

    def check(self, session: object) -> str:
        """The session id if this server issued it; a message asking for a reload otherwise."""
        return self.keys.check(session)

    def session_dir(self, session: str) -> Path:
        """The session's work folder (created, and marked as used now)."""
        path = inside(self.root, self.check(session))
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).touch()
        with self._cond:
            self._addresses.setdefault(session, "")
        return path

    def touch(self, session: str) -> None:
        """A heartbeat: someone is still looking at this session (the page's poll, a client's status call); it
        also counts as use for the time-to-live."""
        now = time.time()
        with self._cond:
            self._heartbeat[self.check(session)] = now
        marker = self.root / session / MARKER
        if marker.exists():
            os.utime(marker, (now, now))

    def usage(self, session: str | None = None) -> tuple[int, int]:
        """(bytes, files) of one session's folder, or of every session's when None."""
        return folder_usage(self.root if session is None else inside(self.root, self.check(session)))

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove sessions (folders, jobs, store rows) unused for longer than the TTL; never one with live jobs."""
        now = time.time() if now is None else now
        busy = {j.session for j in self._all() if j.status not in FINISHED}
        removed = []
        for path in self.root.iterdir():
            if not path.is_dir() or path.name in busy or SESSION_PATTERN.fullmatch(path.name) is None:
                continue
            if now - _last_used(path) > self.limits.ttl_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        with self._cond:
            stale = [s for s in self._addresses if s not in busy and not (self.root / s).exists()]
            for s in set(removed) | set(stale):
                self._addresses.pop(s, None)
                self._heartbeat.pop(s, None)
                self._last_start.pop(s, None)
            for job_id in [j.id for j in self._jobs.values() if j.session in removed]:
                del self._jobs[job_id]
        if self._store is not None and (removed or stale):
            self._store.forget(sorted(set(removed) | set(stale)))
        return removed

    # ---------------------------------------------------------------------------------------------- jobs
    def submit(self, session: str, kind: str, fn: JobFn, label: str = "", after: Sequence[str] = (),
               estimate_s: float = 0.0, budget_s: float = math.inf, meta: dict | None = None) -> Job:
        """Queue `fn` as a job of `session` and start its worker; returns at once.

        Args:
            session: the visitor's session id.
            kind: what the job is ("train-subject", "merge", "generate" …); the page finds jobs by kind.
            fn: called with a `JobContext`; may return an iterable of step records (a generator).
            label: a short description for the page.
            after: ids of jobs that must finish successfully first (else this one is cancelled).
            estimate_s: expected device-seconds (zipq_core.plan), for queue ETAs.
            budget_s: the watchdog stops the job past this while others wait (twice this in any case).
            meta: JSON-able facts the caller needs back later, also after a restart (e.g. what to resume).
        """
        work_dir = self.session_dir(session)
        with self._cond:
            pending = [j for j in self._jobs.values() if j.session == session and j.status not in FINISHED]
            if len(pending) >= self.limits.max_pending_per_session:
                raise ZipqError(f"You already have {len(pending)} jobs waiting or running: wait for one to finish "
                                "or cancel it.")
            if sum(j.status not in FINISHED for j in self._jobs.values()) >= self.limits.max_queued:
                raise ZipqError("The studio's queue is full right now: try again in a few minutes.")
            unknown = [a for a in after if a not in self._jobs]
            if unknown:
                raise ZipqError(f"Unknown job(s) to wait for: {', '.join(unknown)}.")
            job = Job(id=uuid.uuid4().hex[:12], session=session, kind=kind, label=label or kind, after=tuple(after),
                      estimate_s=float(estimate_s), budget_s=float(budget_s), meta=dict(meta or {}))
            self._jobs[job.id] = job
            self._waiting.append(job.id)
            self._heartbeat[session] = time.time()
        self._save(job, force=True)
        ctx = JobContext(job=job, cancel=job.cancel_event, work_dir=work_dir)
        threading.Thread(target=self._worker, args=(job, fn, ctx), name=f"job-{kind}-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            raise ZipqError(f"No job {job_id!r}: it finished long ago and was cleaned up, or never existed.")
        return job

    def queue(self) -> list[Job]:
        """Waiting jobs whose dependencies are done, in the order they will run."""
        with self._cond:
            return self._fair_order()

    def position(self, job_id: str) -> tuple[int, float | None]:
        """(1 for the next queued job to run, 2 for the one after …, 0 when not waiting; estimated seconds until it
        starts, None when not waiting or waiting for another job of its own)."""
        now = time.time()
        with self._cond:
            order = self._fair_order()
            ids = [j.id for j in order]
            if job_id not in ids:
                return (len(order) + 1 if job_id in self._waiting else 0), None
            ahead = order[: ids.index(job_id)]
            running = [j for j in self._jobs.values() if j.status == "running"]
            wait = sum(j.remaining_s(now) for j in running) / self.limits.max_concurrent
            wait += sum(j.estimate_s for j in ahead) / self.limits.max_concurrent
            return ids.index(job_id) + 1, wait

    def snapshot(self, job_id: str) -> dict:
        position, wait = self.position(job_id)
        return self.get(job_id).snapshot(position, wait)

    def jobs_for(self, session: str, kind: str | None = None) -> list[Job]:
        """The session's jobs, oldest first (optionally of one kind)."""
        return [j for j in self._all() if j.session == session and (kind is None or j.kind == kind)]

    def running(self) -> list[Job]:
        """Jobs running now, any session's."""
        return [j for j in self._all() if j.status == "running"]

    def latest(self, session: str, kind: str) -> Job | None:
        found = self.jobs_for(session, kind)
        return found[-1] if found else None

    def cancel(self, job_id: str, reason: str | None = None) -> Job:
        """Cancel a job: a queued one never starts; a running one stops at its next step (it keeps what it made)."""
        job = self.get(job_id)
        with job.lock:
            job.cancel_reason = job.cancel_reason or reason
        job.cancel_event.set()
        with self._cond:
            if job.status == "queued" and job_id in self._waiting:
                self._waiting.remove(job_id)
                job.set_status("cancelled", reason or "Cancelled before it started.")
                self._cond.notify_all()
        self._save(job, force=True)
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
                self._cond.wait(timeout=min(left, 1.0) if left is not None else 1.0)
        return job

    def check_now(self, now: float | None = None) -> None:
        """Enforce budgets and heartbeats once (the watchdog thread calls this periodically)."""
        now = time.time() if now is None else now
        with self._cond:
            jobs = list(self._jobs.values())
            others_wait = bool(self._fair_order())
            heartbeats = dict(self._heartbeat)
        for job in jobs:
            if job.status == "running" and job.started and math.isfinite(job.budget_s):
                over = now - job.started
                if over > 2 * job.budget_s or (over > job.budget_s and others_wait):
                    self.cancel(job.id, f"Stopped after {over:.0f} s: past its time budget of {job.budget_s:.0f} s "
                                        f"on this server{' while others waited' if others_wait else ''}. What it "
                                        "made so far is kept; resume it, or ask for less work.")
            silent = now - heartbeats.get(job.session, now)
            if job.status in ("queued", "running") and silent > self.limits.heartbeat_s:
                self.cancel(job.id, f"Stopped: nobody looked at this session for {silent:.0f} s (the page was closed "
                                    "or lost its connection). What it made so far is kept.")
        for job in jobs:
            if job.status == "running":
                self._save(job)

    def close(self) -> None:
        self._stop.set()
        if self._store is not None:
            self._store.close()

    # ----------------------------------------------------------------------------------------- internals
    def _all(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    def _watch(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.check_now()
            except Exception:  # the watchdog must outlive any one bad check
                log.exception("job watchdog")

    def _blocked_by(self, job: Job) -> tuple[bool, str | None]:
        """(still waiting on a dependency, the reason to give up when a dependency did not succeed)."""
        for dep_id in job.after:
            dep = self._jobs[dep_id]
            if dep.status in ("failed", "cancelled", "interrupted"):
                return False, f"Skipped: '{dep.label}' {dep.status} before it."
            if dep.status != "done":
                return True, None
        return False, None

    def _eligible_since(self, job: Job) -> float:
        finished = [self._jobs[d].finished or job.created for d in job.after]
        return max([job.created, *finished])

    def _fair_order(self) -> list[Job]:
        """Unblocked waiting jobs, least recently served session first, then oldest first (caller holds _cond)."""
        ready = [self._jobs[i] for i in self._waiting if not any(self._blocked_by(self._jobs[i]))]
        return sorted(ready, key=lambda j: (self._last_start.get(j.session, -math.inf), self._eligible_since(j)))

    def _admit(self, job: Job) -> bool:
        """Wait for a free slot in the fair order; False if cancelled or skipped meanwhile."""
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
                order = self._fair_order()
                if not blocked and self._running < self.limits.max_concurrent and order and order[0].id == job.id:
                    self._waiting.remove(job.id)
                    self._running += 1
                    self._last_start[job.session] = time.time()
                    job.set_status("running")
                    self._cond.notify_all()
                    return True
                self._cond.wait(timeout=1.0)

    def _worker(self, job: Job, fn: JobFn, ctx: JobContext) -> None:
        if not self._admit(job):
            self._save(job, force=True)
            return
        self._save(job, force=True)
        status: Status = "done"
        error = None
        try:
            for rec in fn(ctx) or ():
                job.record(rec)
                if isinstance(rec, Step) and rec.adapter_dir:
                    ctx.artifact("adapter", rec.adapter_dir)
                if isinstance(rec, Step) and rec.cancelled:
                    status = "cancelled"
                self._save(job)
        except Cancelled:
            status = "cancelled"
        except ZipqError as e:
            status, error = "failed", str(e)
        except Exception as e:  # a bug, not the user's fault: keep the traceback in the server log only
            log.exception("job %s (%s) crashed", job.id, job.kind)
            status, error = "failed", f"Internal error ({type(e).__name__}); the details are in the server log."
        if status == "done" and job.cancel_event.is_set() and not job.artifacts:
            status = "cancelled"
        if status == "cancelled":
            error = job.cancel_reason or "Cancelled: what was made so far is kept."
        if ctx.work_dir.exists():  # finishing counts as use: the TTL starts from the end of the last job
            (ctx.work_dir / MARKER).touch()
        with self._cond:
            self._running -= 1
            job.set_status(status, error)
            self._cond.notify_all()
        self._save(job, force=True)

    def _save(self, job: Job, force: bool = False) -> None:
        """Persist a job: always on a status change, at most every 2 s for progress."""
        if self._store is None:
            return
        now = time.time()
        if not force and now - self._saved_at.get(job.id, 0.0) < 2.0:
            return
        self._saved_at[job.id] = now
        try:
            self._store.save_job(job)
        except sqlite3.Error:  # a full disk must not kill the job that is running
            log.exception("could not save job %s", job.id)

    def _restore(self) -> None:
        """Load the store: finished jobs as they were, running ones as interrupted, queued ones as cancelled."""
        self._addresses.update(self._store.load_sessions())
        for job in self._store.load_jobs():
            if job.status == "running":
                step = job.latest.step if job.latest else 0
                job.status, job.finished = "interrupted", time.time()
                job.error = f"Interrupted at step {step}: the server restarted while it ran."
                self._store.save_job(job)
            elif job.status == "queued":
                job.status, job.finished = "cancelled", time.time()
                job.error = "The server restarted before this job started: start it again."
                self._store.save_job(job)
            self._jobs[job.id] = job


def _last_used(path: Path) -> float:
    marker = path / MARKER
    return marker.stat().st_mtime if marker.exists() else path.stat().st_mtime
