"""The job registry: server-issued sessions, the job life cycle, fair turns, budgets, heartbeats, persistence across a
restart, caps and TTL clean-up."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import pytest

from zipq_core.errors import ZipqError
from zipq_core.jobs import JobRegistry, Limits, SessionKeys, inside
from zipq_core.progress import Step


@dataclass
class Rec(Step):
    """A step record as the core's stages yield them."""

    messages: list = field(default_factory=list)


def steps(n: int, delay: float = 0.0, gate: threading.Event | None = None):
    """A job function yielding n records; waits on `gate` first when given; honours cancel between steps."""

    def fn(ctx):
        if gate is not None:
            gate.wait(5)
        for i in range(1, n + 1):
            if ctx.cancel.is_set():
                yield Rec(i - 1, n, cancelled=True, adapter_dir=ctx.work_dir / "adapters" / "x")
                return
            time.sleep(delay)
            yield Rec(i, n, loss=1.0 / i, eta=0.0, messages=[f"step {i}"],
                      adapter_dir=ctx.work_dir / "adapters" / "x" if i == n else None)

    return fn


def until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def reg(tmp_path):
    registry = JobRegistry(root=tmp_path / "sessions", limits=Limits(ttl_s=60), watchdog_s=0.05)
    yield registry
    registry.close()


def test_done_job_has_progress_log_and_relative_artifacts(reg):
    s = reg.new_session("1.2.3.4")
    job = reg.submit(s, "train-subject", steps(3), label="subject")
    reg.wait(job.id, timeout=10)
    snap = reg.snapshot(job.id)
    assert snap["status"] == "done" and snap["step"] == 3 and snap["total"] == 3
    assert snap["losses"] == [[1, 1.0], [2, 0.5], [3, pytest.approx(1 / 3)]]
    assert snap["log"] == ["step 1", "step 2", "step 3"]
    assert snap["artifacts"]["adapter"] == "adapters/x"  # a name inside the session, never a server path
    assert str(reg.root) not in str(snap) and "session" not in snap


def test_zipq_error_fails_with_its_message_and_bugs_fail_without_traceback(reg):
    s = reg.new_session()

    def bad(ctx):
        raise ZipqError("Only 1 usable image: add 1 more.")

    def buggy(ctx):
        raise KeyError("internal detail")

    a, b = reg.submit(s, "x", bad), reg.submit(s, "y", buggy)
    reg.wait(a.id, 10), reg.wait(b.id, 10)
    assert a.status == "failed" and a.error == "Only 1 usable image: add 1 more."
    assert b.status == "failed" and "KeyError" in b.error and "internal detail" not in b.error


def test_ids_are_issued_by_the_server_only():
    keys = SessionKeys(b"k" * 32)
    session = keys.new()
    assert keys.check(session) == session and len(session) == 64
    forged = session[:32] + ("0" if session[32] != "0" else "1") + session[33:]
    for bad in ("../../etc", "", "a/b", "aaaaaaaa", 12345, session + "\n", session.upper(), forged,
                SessionKeys(b"x" * 32).new()):
        with pytest.raises(ZipqError, match="reload the page"):
            keys.check(bad)


def test_one_job_at_a_time_and_sessions_take_turns(reg):
    """A session that queued many jobs gets one turn per round: another session's job goes before its second."""
    hog, other = reg.new_session(), reg.new_session()
    gate = threading.Event()
    first = reg.submit(hog, "a", steps(2, gate=gate))
    assert until(lambda: first.status == "running")
    more = [reg.submit(hog, k, steps(1)) for k in "bcd"]
    late = reg.submit(other, "x", steps(1))
    assert reg.running() == [first]
    assert reg.position(late.id)[0] == 1 and reg.position(more[0].id)[0] == 2
    gate.set()
    for j in (first, *more, late):
        reg.wait(j.id, 10)
    assert late.started <= more[0].started, "the other session's job runs before the hog's second"
    assert first.finished <= late.started  # never overlapped


def test_queue_position_and_wait_come_from_estimates(reg):
    a, b = reg.new_session(), reg.new_session()
    gate = threading.Event()
    running = reg.submit(a, "a", steps(1, gate=gate), estimate_s=100)
    assert until(lambda: running.status == "running")
    queued = reg.submit(b, "b", steps(1), estimate_s=30)
    last = reg.submit(a, "c", steps(1), estimate_s=10)
    position, wait = reg.position(last.id)
    assert position == 2 and 100 < wait <= 130
    snap = reg.snapshot(queued.id)
    assert snap["position"] == 1 and 0 < snap["starts_in"] <= 100
    gate.set()


def test_cancel_running_and_queued(reg):
    s = reg.new_session()
    running = reg.submit(s, "a", steps(1000, delay=0.005))
    queued = reg.submit(s, "b", steps(2))
    assert until(lambda: running.latest is not None and running.latest.step >= 2)
    reg.cancel(queued.id, "not now")
    assert queued.status == "cancelled" and queued.error == "not now"
    reg.cancel(running.id)
    reg.wait(running.id, 5)
    assert running.status == "cancelled" and running.latest.step < 1000
    assert "adapter" in running.artifacts  # what was done so far is kept


def test_dependencies_run_in_order_and_skip_after_a_failure(reg):
    s = reg.new_session()

    def bad(ctx):
        raise ZipqError("nope")

    a = reg.submit(s, "a", steps(2, delay=0.01))
    b = reg.submit(s, "b", steps(1), after=[a.id])
    c = reg.submit(s, "c", bad)
    d = reg.submit(s, "d", steps(1), after=[c.id])
    for j in (a, b, c, d):
        reg.wait(j.id, 10)
    assert (a.status, b.status, c.status, d.status) == ("done", "done", "failed", "cancelled")
    assert b.started >= a.finished and "Skipped" in d.error


def test_a_job_past_its_budget_stops_while_others_wait(reg):
    a, b = reg.new_session(), reg.new_session()
    long = reg.submit(a, "a", steps(10_000, delay=0.01), budget_s=0.3)
    waiting = reg.submit(b, "b", steps(1))
    reg.wait(long.id, 10)
    assert long.status == "cancelled" and "time budget" in long.error and "while others waited" in long.error
    reg.wait(waiting.id, 10)
    assert waiting.status == "done"
    # Alone it may run on, but not past twice its budget.
    alone = reg.submit(a, "c", steps(10_000, delay=0.01), budget_s=0.3)
    reg.wait(alone.id, 10)
    assert alone.status == "cancelled" and alone.finished - alone.started >= 0.6


def test_a_session_nobody_looks_at_has_its_jobs_stopped(tmp_path):
    reg = JobRegistry(root=tmp_path, limits=Limits(heartbeat_s=0.5), watchdog_s=0.05)
    s, watched = reg.new_session(), reg.new_session()
    left = reg.submit(s, "a", steps(10_000, delay=0.01))
    kept = reg.submit(watched, "b", steps(150, delay=0.01))
    while kept.status not in ("done", "cancelled", "failed"):
        reg.touch(watched)  # the page polls
        time.sleep(0.05)
    reg.wait(left.id, 10)
    assert left.status == "cancelled" and "nobody looked" in left.error
    assert kept.status == "done"
    reg.close()


def test_restart_shows_finished_interrupted_and_cancelled_jobs(tmp_path):
    root = tmp_path / "sessions"
    reg = JobRegistry(root=root)
    s = reg.new_session("10.0.0.1")
    done = reg.submit(s, "train-style", steps(2), meta={"kind": "style"})
    reg.wait(done.id, 10)
    gate = threading.Event()
    running = reg.submit(s, "train-subject", steps(5, gate=gate), meta={"kind": "subject"})
    assert until(lambda: running.status == "running")
    queued = reg.submit(s, "merge", steps(1), after=[running.id])
    reg.check_now()  # persists progress
    reg.close()  # a crash: the threads die with the process; the store keeps what was written

    again = JobRegistry(root=root)
    assert again.check(s) == s, "the server's key survives a restart: the browser's session is still valid"
    by_kind = {j.kind: j for j in again.jobs_for(s)}
    assert by_kind["train-style"].status == "done" and by_kind["train-style"].artifacts["adapter"] == "adapters/x"
    assert by_kind["train-subject"].status == "interrupted" and "restarted" in by_kind["train-subject"].error
    assert by_kind["train-subject"].meta == {"kind": "subject"}
    assert by_kind["merge"].status == "cancelled" and "start it again" in by_kind["merge"].error
    assert queued.id in {j.id for j in again.jobs_for(s)}
    gate.set()
    again.close()


def test_caps_per_session_per_address_and_queue(tmp_path):
    reg = JobRegistry(root=tmp_path, limits=Limits(max_pending_per_session=2, sessions_per_address=2, max_queued=3))
    a = reg.new_session("5.5.5.5")
    reg.new_session("5.5.5.5")
    with pytest.raises(ZipqError, match="already have 2 sessions"):
        reg.new_session("5.5.5.5")
    gate = threading.Event()
    reg.submit(a, "a", steps(1, gate=gate))
    reg.submit(a, "b", steps(1))
    with pytest.raises(ZipqError, match="already have 2 jobs"):
        reg.submit(a, "c", steps(1))
    b = reg.new_session("6.6.6.6")
    reg.submit(b, "d", steps(1))
    with pytest.raises(ZipqError, match="queue is full"):
        reg.submit(reg.new_session("7.7.7.7"), "e", steps(1))
    gate.set()
    reg.close()


def test_cleanup_removes_old_idle_sessions_only(reg):
    s1, s2 = reg.new_session(), reg.new_session()
    old, fresh = reg.session_dir(s1), reg.session_dir(s2)
    (old / "file.png").write_bytes(b"x")
    job = reg.submit(s1, "a", steps(1))
    reg.wait(job.id, 10)
    past = time.time() - 3600
    os.utime(old / ".last_used", (past, past))
    assert reg.cleanup() == [s1]
    assert not old.exists() and fresh.exists()
    assert reg.jobs_for(s1) == []
    # A session with a running job survives even when old.
    gate = threading.Event()
    busy = reg.submit(s2, "a", steps(1, gate=gate))
    os.utime(fresh / ".last_used", (past, past))
    assert reg.cleanup() == [] and fresh.exists()
    gate.set()
    reg.wait(busy.id, 10)


def test_usage_counts_bytes_and_files(reg):
    s = reg.new_session()
    (reg.session_dir(s) / "a.bin").write_bytes(b"x" * 1000)
    used, files = reg.usage(s)
    assert used >= 1000 and files >= 2  # the file and the session's marker
    assert reg.usage()[0] >= used and math.isfinite(reg.usage()[0])


def test_inside_refuses_paths_that_leave_the_root(tmp_path):
    assert inside(tmp_path, "a", "b.txt") == (tmp_path / "a" / "b.txt").resolve()
    for bad in (("..", "x"), ("a/../../x",), ("/etc/passwd",)):
        with pytest.raises(ZipqError, match="outside your work folder"):
            inside(tmp_path, *bad)
