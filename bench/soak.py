"""Soak test of the public studio: N well-behaved visitors and one hostile one, against a real server on 127.0.0.1.

The app runs in its own process (`app.py`, so its peak memory can be read). Each well-behaved visitor opens a
session, loads an example pair and runs the whole flow (train subject and style, merge, generate) `--rounds`
times, polling `/job_status` as the page would. The hostile visitor floods `/new_session`, sends names that
would leave the work folder, forged session ids and over-budget requests (all must be refused), then keeps the
queue full with the costliest requests the budget allows. Afterwards every session is left to expire and the
disk is measured after the TTL clean-up.

The fairness check: a well-behaved job waits from when it can run (its dependencies done) until it starts; in
that time the scheduler serves other jobs. It must not wait longer than 1.5 × (the well-behaved work served
ahead of it + one hostile budget): a hostile visitor can delay others by at most one budgeted job per turn.

Prints JSON: jobs finished and errors, the longest wait and the worst wait / bound ratio, refusals of the hostile
requests, the app's peak RSS, disk per session after the TTL clean-up.

Usage: python bench/soak.py [--sessions 6] [--rounds 1] [--budget 30] [--steps 60] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, emit_json

PAIRS = [("heart", "zigzag"), ("moon", "grid"), ("arrow", "hatching"), ("bolt", "bullseye")]
FINISHED = ("done", "failed", "cancelled", "interrupted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(work: Path, port: int, args) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(work / "gradio-cache"),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "app.py", "--work-dir", str(work / "sessions"), "--port", str(port),
           "--max-job-seconds", str(args.budget), "--ttl-hours", str(args.ttl / 3600),
           "--sessions-per-address", "4", "--trust-proxy"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "app.log", "w"))


def connect(url: str, address: str = "10.0.0.1", timeout: float = 180):
    """A client; behind the app's trusted proxy each visitor has its own address (X-Forwarded-For)."""
    from gradio_client import Client

    deadline = time.time() + timeout
    while True:
        try:
            return Client(url, verbose=False, headers={"X-Forwarded-For": address})
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def wait_all(client, session: str, poll: float = 1.0, timeout: float = 3600) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = client.predict(session, api_name="/job_status")["jobs"]
        if jobs and all(j["status"] in FINISHED for j in jobs):
            return jobs
        time.sleep(poll)
    raise TimeoutError(session)


def well_behaved(url: str, index: int, args) -> dict:
    client = connect(url, f"10.0.1.{index + 1}")
    session = client.predict(api_name="/new_session")
    subject, style = PAIRS[index % len(PAIRS)]
    errors = []
    for r in range(args.rounds):
        try:
            client.predict(session, subject, style, args.steps, "zipq", args.merge_steps, "", r,
                           api_name="/run_flow")
            wait_all(client, session)
        except Exception as e:  # counted, not raised: the soak reports every failure
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    jobs = client.predict(session, api_name="/job_status")["jobs"]
    print(f"visitor {index}: {len(jobs)} jobs, {len(errors)} errors", file=sys.stderr, flush=True)
    return {"session": session, "jobs": jobs, "errors": errors}


def hostile(url: str, args, stop: threading.Event) -> dict:
    """Everything a hostile visitor may try; returns what was refused and the jobs it got."""
    from gradio_client import handle_file

    client = connect(url, "10.6.6.6")
    refused: dict[str, int] = {}

    def expect_refusal(name: str, fn) -> None:
        try:
            fn()
        except Exception:
            refused[name] = refused.get(name, 0) + 1

    session = client.predict(api_name="/new_session")
    expect_refusal("traversal_token", lambda: _refusing(client.predict(
        session, [handle_file(str(ROOT / "assets/examples/subjects/heart/0.png"))], "x/../../../etc/NAME", "heart",
        api_name="/prepare_subject")))
    expect_refusal("forged_session", lambda: client.predict("a" * 64, api_name="/job_status"))
    expect_refusal("over_budget_generation", lambda: client.predict(
        session, "a red heart", "", 0, 200, 5.0, 2048, 2048, 16, 1.5, 1.5, 1.0, 0.5, 8, api_name="/generate"))
    client.predict(session, "heart", "zigzag", api_name="/load_examples")
    expect_refusal("over_budget_training", lambda: client.predict(
        session, "subject", "dora", "none", False, 64, 100000, 1e-3, 64, False, 0, api_name="/train"))
    for _ in range(10):  # flood: past the per-address cap (4)
        expect_refusal("session_flood", lambda: client.predict(api_name="/new_session"))
    # Then the costliest requests the budget allows, back to back: trainings sized to the budget.
    submitted = 0
    while not stop.is_set():
        steps = max(1, int(args.hostile_steps))
        try:
            client.predict(session, "both", "dora", "none", False, 64, steps, 1e-3, 64, False, 0, api_name="/train")
            submitted += 2
        except Exception as e:
            if "limit per job" in str(e):
                args.hostile_steps = steps * 0.8  # the budget's edge: just under it
            else:
                time.sleep(1.0)
        client.predict(session, api_name="/job_status")  # a heartbeat, as its page would send
        time.sleep(1.0)
    jobs = client.predict(session, api_name="/job_status")["jobs"]
    return {"session": session, "refused": refused, "jobs": jobs, "submitted": submitted}


def _refusing(outputs) -> None:
    """/prepare_* explain a refusal beside the upload (and in a toast) instead of raising: raise for the count."""
    if "at most 32 letters" in str(outputs[1]):
        raise RuntimeError("refused")


def eligible_at(job: dict, chain: list[dict]) -> float:
    """When a job of the whole flow could run: each after the one before it (subject, style, merge, generate)."""
    index = chain.index(job)
    return max(job["created"], chain[index - 1]["finished"] or 0) if index else job["created"]


def served(job: dict, until: float, since: float) -> float:
    """Seconds `job` ran inside [since, until]."""
    return max(0.0, min(job["finished"] or until, until) - max(job["started"], since))


def fairness(well: list[dict], hostile_jobs: list[dict], budget: float) -> dict:
    everyone = [j for w in well for j in w["jobs"]] + hostile_jobs
    hostile_ids = {j["id"] for j in hostile_jobs}
    worst_ratio, longest, rows = 0.0, 0.0, []
    for w in well:
        flows = [w["jobs"][i:i + 4] for i in range(0, len(w["jobs"]), 4)]
        for chain in flows:
            for job in chain:
                if not job["started"]:
                    continue
                start = eligible_at(job, chain)
                wait = max(0.0, job["started"] - start)
                ahead = [j for j in everyone if j["started"] and j["id"] != job["id"]
                         and j["started"] < job["started"] and (j["finished"] or job["started"]) > start]
                wb_ahead = sum(served(j, job["started"], start) for j in ahead if j["id"] not in hostile_ids)
                hostile_ahead = sum(served(j, job["started"], start) for j in ahead if j["id"] in hostile_ids)
                ratio = wait / (1.5 * (wb_ahead + budget))
                worst_ratio, longest = max(worst_ratio, ratio), max(longest, wait)
                rows.append({"kind": job["kind"], "wait_s": round(wait, 1), "well_behaved_ahead_s": round(wb_ahead, 1),
                             "hostile_ahead_s": round(hostile_ahead, 1)})
    return {"longest_wait_s": round(longest, 1), "worst_wait_over_bound": round(worst_ratio, 3),
            "bound_met": worst_ratio <= 1.0, "waits": rows}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=6, help="well-behaved visitors at once")
    ap.add_argument("--rounds", type=int, default=1, help="whole flows per visitor")
    ap.add_argument("--budget", type=float, default=30.0, help="--max-job-seconds of the app")
    ap.add_argument("--steps", type=int, default=60, help="training steps of a well-behaved flow")
    ap.add_argument("--merge-steps", type=int, default=20)
    ap.add_argument("--hostile-steps", type=float, default=400.0, help="first training size the hostile tries")
    ap.add_argument("--ttl", type=float, default=30.0, help="seconds of the app's time-to-live (clean-up check)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    app = start_app(work, port, args)
    url = f"http://127.0.0.1:{port}/"
    started = time.time()
    try:
        connect(url)
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(args.sessions + 1) as pool:
            bad = pool.submit(hostile, url, args, stop)
            time.sleep(5)  # the hostile visitor is already in the queue when the others arrive
            good = [pool.submit(well_behaved, url, i, args) for i in range(args.sessions)]
            try:
                well = [f.result() for f in good]
            finally:
                stop.set()
            evil = bad.result()
        hostile_jobs = evil["jobs"]
        connect(url).predict(evil["session"], "all", api_name="/cancel")  # what it still has queued
        jobs = [j for w in well for j in w["jobs"]]
        result = {
            "sessions": args.sessions, "rounds": args.rounds, "budget_s": args.budget,
            "well_behaved_jobs": len(jobs), "finished": sum(j["status"] == "done" for j in jobs),
            "errors": [e for w in well for e in w["errors"]]
            + [f"{j['kind']}: {j['status']}: {j['error']}" for j in jobs if j["status"] != "done"],
            "hostile": {"refused": evil["refused"], "jobs": len(hostile_jobs),
                        "stopped_at_budget": sum("time budget" in (j["error"] or "") for j in hostile_jobs),
                        "longest_job_s": round(max([(j["finished"] or 0) - (j["started"] or 0) for j in hostile_jobs
                                                    if j["started"]] or [0]), 1)},
            **fairness(well, hostile_jobs, args.budget),
            "app_peak_rss_mb": round(peak_rss_mb(app.pid), 1),
            "wall_s": round(time.time() - started, 1),
        }
        sessions_dir = work / "sessions"
        result["disk_before_ttl_mb"] = round(folder_bytes(sessions_dir) / 2**20, 2)
        time.sleep(args.ttl + 5)
        connect(url).predict(api_name="/new_session")  # a visitor arrives: expired sessions are cleaned up
        time.sleep(1)
        remaining = [p for p in sessions_dir.iterdir() if p.is_dir()]
        result["disk_after_ttl"] = {"sessions_left": len(remaining),
                                    "bytes_per_session": [folder_bytes(p) for p in remaining],
                                    "gradio_cache_bytes": folder_bytes(work / "gradio-cache")}
    finally:
        app.send_signal(signal.SIGTERM)
        try:
            app.wait(30)
        except subprocess.TimeoutExpired:
            app.kill()
        shutil.rmtree(work, ignore_errors=True)
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
