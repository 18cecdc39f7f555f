"""The job registry: status life cycle, progress from step records, FIFO concurrency, cancel, TTL cleanup."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import pytest

from zipq_core.errors import ZipqError
from zipq_core.jobs import JobRegistry, check_session_id, new_session_id

S1, S2 = "session-aaaaaaaa", "session-bbbbbbbb"


@dataclass
class Rec:
    """Looks like a TrainStep / MergeStep."""

    step: int
    total: int
    loss: float = 0.5
    eta: float = 1.0
    elapsed: float = 0.0
    sample: object = None
    messages: list = field(default_factory=list)
    adapter_dir: object = None
    cancelled: bool = False


def steps(n: int, delay: float = 0.0, gate: threading.Event | None = None):
    """A job function yielding n records; waits on `gate` first when given; honours cancel between steps."""

    def fn(ctx):
        if gate is not None:
            gate.wait(5)
        for i in range(1, n + 1):
            if ctx.cancel.is_set():
                yield Rec(i - 1, n, cancelled=True, adapter_dir=ctx.work_dir)
                return
            time.sleep(delay)
            yield Rec(i, n, loss=1.0 / i, messages=[f"step {i}"], adapter_dir=ctx.work_dir if i == n else None)

    return fn


@pytest.fixture
def reg(tmp_path) -> JobRegistry:
    return JobRegistry(root=tmp_path / "sessions", max_concurrent=1, ttl_s=60)


def test_done_job_has_progress_log_and_artifacts(reg):
    job = reg.submit(S1, "train-subject", steps(3), label="subject")
    reg.wait(job.id, timeout=10)
    snap = reg.snapshot(job.id)
    assert snap["status"] == "done" and snap["step"] == 3 and snap["total"] == 3
    assert snap["losses"] == [[1, 1.0], [2, 0.5], [3, pytest.approx(1 / 3)]]
    assert snap["log"] == ["step 1", "step 2", "step 3"]
    assert snap["artifacts"]["adapter"] == str(reg.root / S1)


def test_zipq_error_fails_with_its_message_and_bugs_fail_without_traceback(reg):
    def bad(ctx):
        raise ZipqError("Only 1 usable image: add 1 more.")

    def buggy(ctx):
        raise KeyError("internal detail")

    a, b = reg.submit(S1, "x", bad), reg.submit(S1, "y", buggy)
    reg.wait(a.id, 10), reg.wait(b.id, 10)
    assert a.status == "failed" and a.error == "Only 1 usable image: add 1 more."
    assert b.status == "failed" and "KeyError" in b.error and "internal detail" not in b.error
    assert "Traceback" not in (b.error or "")


def test_one_heavy_job_at_a_time_fifo_with_positions(reg):
    gate = threading.Event()
    first = reg.submit(S1, "a", steps(2, gate=gate))
    second = reg.submit(S2, "b", steps(2))
    third = reg.submit(S1, "c", steps(2))
    deadline = time.time() + 5
    while first.status != "running" and time.time() < deadline:
        time.sleep(0.01)
    assert first.status == "running" and reg.running() == [first]
    assert (second.status, reg.position(second.id)) == ("queued", 1)
    assert (third.status, reg.position(third.id)) == ("queued", 2)
    gate.set()
    for j in (first, second, third):
        reg.wait(j.id, 10)
    assert [j.status for j in (first, second, third)] == ["done"] * 3
    assert first.finished <= second.started and second.finished <= third.started  # never overlapped


def test_cancel_running_and_queued(reg):
    running = reg.submit(S1, "a", steps(1000, delay=0.005))
    queued = reg.submit(S1, "b", steps(2))
    while running.latest is None or running.latest.step < 2:
        time.sleep(0.005)
    reg.cancel(queued.id)
    assert queued.status == "cancelled"
    reg.cancel(running.id)
    reg.wait(running.id, 5)
    assert running.status == "cancelled" and running.latest.step < 1000
    assert "adapter" in running.artifacts  # what was done so far is kept


def test_dependencies_run_in_order_and_skip_after_a_failure(reg):
    def bad(ctx):
        raise ZipqError("nope")

    a = reg.submit(S1, "a", steps(2, delay=0.01))
    b = reg.submit(S1, "b", steps(1), after=[a.id])
    c = reg.submit(S1, "c", bad)
    d = reg.submit(S1, "d", steps(1), after=[c.id])
    for j in (a, b, c, d):
        reg.wait(j.id, 10)
    assert (a.status, b.status, c.status, d.status) == ("done", "done", "failed", "cancelled")
    assert b.started >= a.finished and "Skipped" in d.error


def test_sessions_are_isolated_and_ids_checked(reg):
    a = reg.submit(S1, "a", steps(1))
    b = reg.submit(S2, "a", steps(1))
    assert [j.id for j in reg.jobs_for(S1)] == [a.id] and [j.id for j in reg.jobs_for(S2)] == [b.id]
    assert reg.session_dir(S1) != reg.session_dir(S2)
    for bad in ("../../etc", "", "a/b", "short"):
        with pytest.raises(ZipqError):
            check_session_id(bad)
    assert check_session_id(new_session_id())
    with pytest.raises(ZipqError):
        reg.get("nope")


def test_quota_per_session(tmp_path):
    reg = JobRegistry(root=tmp_path, max_pending_per_session=2)
    gate = threading.Event()
    reg.submit(S1, "a", steps(1, gate=gate))
    reg.submit(S1, "b", steps(1))
    with pytest.raises(ZipqError, match="already have 2 jobs"):
        reg.submit(S1, "c", steps(1))
    gate.set()


def test_cleanup_removes_old_idle_sessions_only(reg):
    old, fresh = reg.session_dir(S1), reg.session_dir(S2)
    (old / "file.png").write_bytes(b"x")
    job = reg.submit(S1, "a", steps(1))
    reg.wait(job.id, 10)
    past = time.time() - 3600
    os.utime(old / ".last_used", (past, past))
    assert reg.cleanup() == [S1]
    assert not old.exists() and fresh.exists()
    assert reg.jobs_for(S1) == []
    # A session with a running job survives even when old.
    gate = threading.Event()
    busy = reg.submit(S2, "a", steps(1, gate=gate))
    os.utime(fresh / ".last_used", (past, past))
    assert reg.cleanup() == [] and fresh.exists()
    gate.set()
    reg.wait(busy.id, 10)


def test_inside_refuses_paths_that_leave_the_root(tmp_path):
    from zipq_core.jobs import inside

    assert inside(tmp_path, "a", "b.txt") == (tmp_path / "a" / "b.txt").resolve()
    for bad in (("..", "x"), ("a/../../x",), ("/etc/passwd",)):
        with pytest.raises(ZipqError, match="outside your work folder"):
            inside(tmp_path, *bad)
