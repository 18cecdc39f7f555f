"""The public page against a hostile visitor (gradio_client and plain HTTP on 127.0.0.1): names that would leave the
work folder, chosen or forged session ids, files by path, requests over the time budget, clients that go away,
and a crash of the server process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from zipq_core.jobs import Limits

from helpers import free_port, launch, wait_jobs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """An app with a small budget and a short heartbeat, as an operator of a busy public Space would set."""
    url, demo, studio = launch(tmp_path_factory.mktemp("strict"), budget_s=60.0,
                               limits=Limits(heartbeat_s=3.0, sessions_per_address=30))
    yield url, studio
    demo.close()
    studio.registry.close()


def test_a_traversal_token_is_refused_and_nothing_is_written_outside(strict, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    client = client_for(strict[0])
    session = client.predict(api_name="/new_session")
    Image.new("RGB", (96, 96), "red").save(tmp_path / "a.png")
    outside = tmp_path / "somewhere"
    for token in (f"x/../../../../{outside}/NAME", "a" * 33, "s k s", "sks;rm", "../sks"):
        _, notes, _, _ = client.predict(session, [handle_file(str(tmp_path / "a.png"))], token, "heart",
                                        api_name="/prepare_subject")
        assert "at most 32 letters" in notes
    _, notes, _, _ = client.predict(session, [handle_file(str(tmp_path / "a.png"))], "sks", "x" * 65,
                                    api_name="/prepare_subject")
    assert "at most 64 printable" in notes
    assert not outside.exists()


def endpoint_arguments(client) -> dict[str, list]:
    """For every named endpoint taking a session: harmless values for its other parameters."""
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    args = {}
    for name, spec in api.items():
        params = spec["parameters"]
        if not params or params[0]["parameter_name"] != "session":
            continue
        values = []
        for p in params[1:]:
            default = p.get("parameter_default")
            kind = (p.get("python_type") or {}).get("type", "")
            values.append(default if default is not None else (1 if "float" in kind or "int" in kind else
                                                               [] if "list" in kind.lower() else "x"))
        args[name] = values
    return args


def test_a_chosen_or_forged_session_id_is_refused_on_every_endpoint(strict):
    client = client_for(strict[0])
    real = client.predict(api_name="/new_session")
    forged = real[:32] + ("0" if real[32] != "0" else "1") + real[33:]
    arguments = endpoint_arguments(client)
    assert {"/train", "/generate", "/merge", "/resume", "/cancel", "/job_status", "/compare"} <= set(arguments)
    before = set(strict[1].registry.root.iterdir())
    for name, rest in arguments.items():
        for bad in ("aaaaaaaa", "12345678", real + "\n", forged, "../../etc", real.upper()):
            with pytest.raises(Exception) as excinfo:
                client.predict(bad, *rest, api_name=name)
            assert "reload the page" in str(excinfo.value), (name, bad, str(excinfo.value))
    assert set(strict[1].registry.root.iterdir()) == before, "a refused id creates no folder"


def test_session_files_are_not_served_by_path_and_responses_hold_no_server_paths(strict):
    client = client_for(strict[0])
    session = client.predict(api_name="/new_session")
    client.predict(session, "heart", "zigzag", api_name="/load_examples")
    root = strict[1].registry.root
    settings = root / session / "settings.json"
    assert settings.exists()
    for target in (settings, root / session / "subject" / "images" / "0.png", root / "jobs.sqlite"):
        url = f"{strict[0]}gradio_api/file={target}"
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(url, timeout=10)
        assert excinfo.value.code in (403, 404)
    status = client.predict(session, api_name="/job_status")
    other = client.predict(api_name="/new_session")
    assert str(root) not in json.dumps(status) and other not in json.dumps(status)


# One 128-px image of 100 steps: about a sixth of the 60 s budget on one core of this 2-core machine (its estimate
# is 10 s), and long enough to cancel or to drop the connection while it runs.
WITHIN_BUDGET = ("a red heart", "", 0, 100, 5.0, 128, 128, 1, 1.0, 1.0, 1.0, 0.5, 1)


def test_a_generation_over_budget_is_refused_and_one_within_can_be_cancelled(strict):
    client = client_for(strict[0])
    session = client.predict(api_name="/new_session")
    with pytest.raises(Exception) as excinfo:  # 2048 px on mini: attention alone makes it minutes
        client.predict(session, "a red heart", "", 0, 50, 5.0, 2048, 2048, 8, 1.0, 1.0, 1.0, 0.5, 1,
                       api_name="/generate")
    assert "over its 60 s limit per job" in str(excinfo.value) and "fewer or smaller images" in str(excinfo.value)
    job = client.submit(session, *WITHIN_BUDGET, api_name="/generate")  # long enough to cancel
    registry = strict[1].registry
    deadline = time.time() + 30
    while time.time() < deadline and not any(j.status == "running" for j in registry.jobs_for(session)):
        assert not job.done(), f"the generation within the budget was refused: {job.exception()}"
        time.sleep(0.1)
    assert "Cancelling 1 job" in client.predict(session, "generate", api_name="/cancel")
    (gen,) = registry.jobs_for(session)
    registry.wait(gen.id, 30)
    assert gen.status == "cancelled" and gen.latest is not None and gen.latest.step < gen.latest.total
    with pytest.raises(Exception) as excinfo:  # the caller learns its generation was cancelled
        job.result(timeout=30)
    assert "Cancelled" in str(excinfo.value)


def test_a_client_that_drops_its_connection_stops_its_job(strict):
    """What a closed browser tab does: the event stream's connection drops while the generation runs."""
    import httpx

    url, studio = strict
    session = client_for(url).predict(api_name="/new_session")
    config = httpx.get(url + "config").json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate")
    data = [session, *WITHIN_BUDGET]
    httpx.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": "tab1",
                                                    "event_data": None, "trigger_id": None}).raise_for_status()
    registry = studio.registry
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": "tab1"}, timeout=30) as stream:
        for line in stream.iter_lines():
            assert "process_completed" not in line, f"the generation within the budget was refused: {line}"
            if any(j.status == "running" for j in registry.jobs_for(session)):
                break  # leaving the block closes the connection mid-job
    (gen,) = registry.jobs_for(session)
    registry.wait(gen.id, 30)
    assert gen.status == "cancelled" and ("went away" in gen.error or "nobody looked" in gen.error)
    assert gen.latest is None or gen.latest.step < gen.latest.total


def test_destructive_actions_keep_the_earlier_result(strict, tmp_path):
    from gradio_client import handle_file

    client = client_for(strict[0])
    session = client.predict(api_name="/new_session")
    client.predict(session, "heart", "zigzag", api_name="/load_examples")
    paths = sorted((strict[1].registry.root / session / "subject" / "images").iterdir())
    # A refused re-upload leaves the accepted images as they were.
    (tmp_path / "junk.png").write_text("not an image")
    gallery, notes, _, _ = client.predict(session, [handle_file(str(tmp_path / "junk.png"))], "sks", "heart",
                                          api_name="/prepare_subject")
    assert gallery == [] and "No usable image" in notes
    assert sorted((strict[1].registry.root / session / "subject" / "images").iterdir()) == paths
    # Retraining keeps the merged adapter; the page says it was made from earlier adapters.
    client.predict(session, "both", "dora", "none", False, 4, 4, 4, 1e-3, "cosine", 64, False, 0, api_name="/train")
    wait_jobs(client, session)
    client.predict(session, "direct", 0.01, 5, 1.0, 1.0, 0.5, 0.0, api_name="/merge")
    wait_jobs(client, session)
    client.predict(session, "subject", "dora", "none", False, 4, 6, 6, 1e-3, "cosine", 64, False, 0, api_name="/train")
    wait_jobs(client, session)
    from studio.handlers import Handlers

    merge_panel = Handlers(strict[1]).poll(session, None)[6]
    assert (strict[1].registry.root / session / "adapters" / "merged").exists()
    assert "made from earlier adapters" in merge_panel


def test_budget_checks_apply_to_training_too(strict):
    client = client_for(strict[0])
    session = client.predict(api_name="/new_session")
    client.predict(session, "heart", "zigzag", api_name="/load_examples")
    with pytest.raises(Exception) as excinfo:
        client.predict(session, "subject", "dora", "none", False, 8, 100000, 100000, 1e-3, "cosine", 64, False, 0,
                       api_name="/train")
    assert "limit per job" in str(excinfo.value) and "lower the steps" in str(excinfo.value)


def test_after_a_crash_the_page_shows_the_interrupted_job_with_resume(tmp_path):
    """Kill the server process mid-training, start it again on the same work folder: the job shows as interrupted,
    with the step a resume continues from."""
    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def start(port: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "app.py", "--work-dir", str(work), "--port", str(port)], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def connect(port: int):
        deadline = time.time() + 120
        while True:
            try:
                return client_for(f"http://127.0.0.1:{port}/")
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    port = free_port()
    server = start(port)
    try:
        client = connect(port)
        session = client.predict(api_name="/new_session")
        client.predict(session, "heart", "zigzag", api_name="/load_examples")
        client.predict(session, "subject", "dora", "none", False, 4, 400, 400, 1e-3, "cosine", 64, False, 0,
                       api_name="/train")
        checkpoints = work / session / "adapters" / "subject" / "checkpoints"
        deadline = time.time() + 120
        while not list(checkpoints.glob("step-*/trainer_state.pt")) and time.time() < deadline:
            client.predict(session, api_name="/job_status")
            time.sleep(0.3)
        assert list(checkpoints.glob("step-*/trainer_state.pt")), "no checkpoint before the crash"
        os.kill(server.pid, signal.SIGKILL)
        server.wait(30)
        port = free_port()
        server = start(port)
        client = connect(port)
        (job,) = client.predict(session, api_name="/job_status")["jobs"]
        assert job["status"] == "interrupted" and "restarted" in job["error"]
        msg = client.predict(session, "subject", "dora", "none", False, 4, 400, 400, 1e-3, "cosine", 64, False, 0,
                             api_name="/resume")
        assert msg.startswith("Resuming")
        jobs = client.predict(session, api_name="/job_status")["jobs"]
        assert [j["status"] for j in jobs][0] == "interrupted" and jobs[1]["label"] == "resume subject"
        client.predict(session, "all", api_name="/cancel")
    finally:
        server.kill()
        server.wait(30)


def test_the_page_line_of_an_interrupted_job_offers_resume():
    from studio.handlers import job_line

    snap = {"status": "interrupted", "error": "Interrupted at step 120: the server restarted while it ran.",
            "total": 400, "step": 120, "loss": 0.1, "eta": None, "started": 1.0, "finished": 2.0}
    line = job_line(snap, "Subject", resume_step=100)
    assert "interrupted" in line and "continues from step 100" in line


def test_flooding_new_session_hits_the_per_address_cap(strict):
    """Run last in this module: it uses up the address's sessions."""
    client = client_for(strict[0])
    with pytest.raises(Exception) as excinfo:
        for _ in range(40):
            client.predict(api_name="/new_session")
    assert "sessions open" in str(excinfo.value)

