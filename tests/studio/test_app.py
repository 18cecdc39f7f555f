"""The app through `gradio_client` against a server launched in-process on mini.

The whole flow (examples → train subject and style → merge → generate), cancel, a bad upload's message
and two isolated sessions. Steps are few so the file runs in about a minute on a 2-core CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import wait_jobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(launched_app):
    return launched_app


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def error_text(excinfo) -> str:
    return str(excinfo.value)


def test_api_lists_the_main_actions(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/new_session", "/load_examples", "/prepare_subject", "/prepare_style", "/train", "/resume", "/cancel",
            "/merge", "/generate", "/compare", "/run_flow", "/job_status"} <= names


def test_whole_flow_examples_train_merge_generate(client, server):
    session = client.predict(api_name="/new_session")
    filled = client.predict(session, "heart", "zigzag", api_name="/load_examples")
    subject_gallery, subject_notes, token, noun, style_gallery, _, style_token, _, prompt = filled
    assert len(subject_gallery) == 5 and len(style_gallery) == 4 and "5 images ready" in subject_notes
    # The examples' caption sidecars reach training: each view is labelled with the caption it trains.
    assert subject_gallery[0]["caption"] == "0.png: a photo of sks heart, with a flat fill"
    assert (token, noun, style_token) == ("sks", "heart", "zkz")
    assert prompt == "a photo of sks heart in zkz style"

    msg = client.predict(session, "both", "dora", "none", False, 4, 12, 8, 1e-3, "cosine", 64, False, 2,
                         api_name="/train")
    assert "train subject" in msg and "train style" in msg
    jobs = wait_jobs(client, session)  # each kind its own steps
    assert [(j["kind"], j["status"], j["step"]) for j in jobs] == [("train-subject", "done", 12),
                                                                    ("train-style", "done", 8)]
    assert jobs[0]["losses"] and jobs[0]["artifacts"]["adapter"]

    msg = client.predict(session, "zipq", 0.01, 5, 1.0, 1.0, 0.5, 1.0, api_name="/merge")
    assert "ZipQDoRA" in msg
    merge = wait_jobs(client, session)[-1]
    assert (merge["kind"], merge["status"]) == ("merge", "done"), merge

    gallery, files, note = client.predict(session, prompt, "", 3, 10, 5.0, 64, 64, 2, 1.0, 0.7,
                                          0.5, 0.5, 2, api_name="/generate")
    assert len(gallery) == 2 and len(files) == 2 and "merged adapter" in note and "best of 2 candidates" in note
    assert all(Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)

    # The download buttons now point at published copies of the three adapter files (the Train and Merge tabs).
    from studio.handlers import Handlers

    studio = server[1]
    panel = Handlers(studio).poll(session, None)
    paths = [b.value["path"] for b in (panel[4], panel[5], panel[8]) if b.interactive]
    assert [p for p in paths if p.endswith(".safetensors")] == paths and len(paths) == 3
    assert paths[0].endswith("zipq-subject-sks.safetensors") and paths[1].endswith("zipq-style-zkz.safetensors")
    assert not any(str(studio.registry.root) in p for p in paths), "the work folder itself is never served"


def test_run_whole_flow_button(client):
    session = client.predict(api_name="/new_session")
    out = client.predict(session, "moon", "grid", 8, 8, "direct", 100, "", 1, api_name="/run_flow")
    assert out[2:4] == ("sks", "moon") and out[8] == "a photo of sks moon in zkz style"
    assert "train subject → train style → merge" in out[-1]
    jobs = wait_jobs(client, session)
    assert [j["status"] for j in jobs] == ["done"] * 4, jobs
    images = [p for k, p in jobs[-1]["artifacts"].items() if k.startswith("image")]
    assert len(images) == 4 and all(p.startswith("outputs/") for p in images)  # names inside the session only


def test_cancel_stops_a_training_and_keeps_it_resumable(client):
    session = client.predict(api_name="/new_session")
    client.predict(session, "heart", "zigzag", api_name="/load_examples")
    # Long enough to cancel mid-way, well inside the default per-job budget even on a slow or busy machine.
    client.predict(session, "subject", "dora", "none", False, 4, 2000, 2000, 1e-3, "cosine", 64, False, 0,
                   api_name="/train")
    deadline = time.time() + 60
    while time.time() < deadline:
        job = client.predict(session, api_name="/job_status")["jobs"][-1]
        if job["status"] == "running" and job["step"] >= 2:
            break
        time.sleep(0.2)
    assert "Cancelling 1 job" in client.predict(session, "train", api_name="/cancel")
    job = wait_jobs(client, session, timeout=30)[-1]
    assert job["status"] == "cancelled" and 2 <= job["step"] < 2000
    assert job["artifacts"]["adapter"] == "adapters/subject"  # the adapter so far was saved
    # Resume takes the settings the training began with, whatever the form says now (here: 10 steps).
    msg = client.predict(session, "subject", "dora", "none", False, 4, 10, 10, 1e-3, "cosine", 64, False, 0,
                         api_name="/resume")
    assert msg.startswith("Resuming with the settings it started with")
    job = client.predict(session, api_name="/job_status")["jobs"][-1]
    assert job["label"] == "resume subject" and job["total"] in (0, 2000)
    client.predict(session, "all", api_name="/cancel")
    wait_jobs(client, session, timeout=30)


def test_bad_upload_shows_reasons_without_traceback(client, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    session = client.predict(api_name="/new_session")
    (tmp_path / "notes.png").write_text("this is not an image")
    Image.new("RGB", (20, 20), "red").save(tmp_path / "tiny.png")
    Image.new("RGB", (96, 80), "blue").save(tmp_path / "ok.png")
    files = [handle_file(str(tmp_path / n)) for n in ("notes.png", "tiny.png", "ok.png")]
    gallery, notes, _, _ = client.predict(session, files, "sks", "heart", api_name="/prepare_subject")
    assert gallery == [] and "Only 1 usable image" in notes and "notes.png" in notes and "tiny.png" in notes
    assert "Traceback" not in notes and "File \"" not in notes
    # A bad token and a bad session id are messages too.
    _, notes, _, _ = client.predict(session, [handle_file(str(tmp_path / "ok.png"))], "two words", "",
                                    api_name="/prepare_style")
    assert "one word" in notes and "Traceback" not in notes
    with pytest.raises(Exception) as excinfo:
        client.predict("../../etc", api_name="/job_status")
    assert "reload the page" in error_text(excinfo)
    # Uploads above launch(max_file_size=…) are refused before they reach the app.
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * (21 * 1024 * 1024))
    with pytest.raises(Exception) as excinfo:
        client.predict(session, [handle_file(str(big))], "sks", "", api_name="/prepare_subject")
    assert "maximum file size" in error_text(excinfo)


def test_two_sessions_are_isolated(client, server):
    studio = server[1]
    a = client.predict(api_name="/new_session")
    b = client.predict(api_name="/new_session")
    assert a != b
    client.predict(a, "bolt", "hatching", api_name="/load_examples")
    client.predict(a, "subject", "lora", "none", False, 4, 4, 4, 1e-3, "cosine", 64, False, 0, api_name="/train")
    wait_jobs(client, a)
    assert client.predict(b, api_name="/job_status")["jobs"] == []
    assert not (studio.registry.root / b / "subject").exists()
    with pytest.raises(Exception) as excinfo:  # b has no adapters of its own; a's are invisible to it
        client.predict(b, "a photo of sks bolt", 0, 5, 1, api_name="/compare")
    assert "nothing to compare" in error_text(excinfo)
    # A page reload keeps the browser's session: restore() re-attaches to a's files and tokens.
    from studio.handlers import Handlers

    restored = Handlers(studio).restore(a)
    assert restored[0] == a and len(restored[2]) == 5 and restored[7].value == "bolt"  # the class-noun box


def test_base_choice_an_existing_lora_and_a_download_format_through_the_api(client, server, tmp_path):
    from gradio_client import handle_file

    from zipq_core.adapters import save_adapter

    from helpers import adapter_for

    studio = server[1]
    session = client.predict(api_name="/new_session")
    fields = client.predict(session, "mini", api_name="/choose_base")
    assert fields[0] == "mini" and "mini" in fields[1] and fields[2] == studio.defaults.steps
    for forged in ("/etc/passwd", "stabilityai/stable-diffusion-xl-base-1.0"):  # never a base outside the list
        with pytest.raises(Exception) as excinfo:
            client.predict(session, forged, api_name="/choose_base")
        assert "Traceback" not in error_text(excinfo)
    assert studio.base_name(session) == "mini" and studio.bases.choices() == ["mini"]

    weights = save_adapter(adapter_for(studio.base.unet, dora=True, seed=7), tmp_path / "mine")
    lora = tmp_path / "my_style.safetensors"
    lora.write_bytes(weights.read_bytes())
    msg = client.predict(session, "style", [handle_file(str(lora))], api_name="/import_adapter")
    assert msg.startswith("Using my_style.safetensors") and "as the style adapter" in msg
    (tmp_path / "model.ckpt").write_text("a pickle")
    with pytest.raises(Exception) as excinfo:  # refused by the upload's file types before it reaches the studio
        client.predict(session, "subject", [handle_file(str(tmp_path / "model.ckpt"))], api_name="/import_adapter")
    assert "Invalid file type" in error_text(excinfo) and not studio.paths(session).has_adapter("subject")
    subject, style = client.predict(session, "lycoris", api_name="/train_format")
    assert subject["interactive"] is False and subject["value"] is None  # no subject adapter: a disabled button
    assert style["interactive"] and style["label"] == "Download style adapter (lycoris)"
    assert style["value"].endswith("zipq-style-sks-lycoris.safetensors") and Path(style["value"]).stat().st_size > 0


def test_share_fails_fast_offline(monkeypatch, capsys):
    from studio import launch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    assert launch.main(["--share"]) == 2
    assert time.time() - started < 5
    assert "--share needs internet access" in capsys.readouterr().err


def test_cli_flags_validate_and_launch_settings():
    from studio import launch
    from zipq_core import ZipqError

    assert launch.parse_auth("ada:secret") == ("ada", "secret") and launch.parse_auth(None) is None
    for bad in ("ada", "ada:", ":secret"):
        with pytest.raises(ZipqError, match="user:password"):
            launch.parse_auth(bad)
    assert launch.main(["--auth", "nopassword"]) == 2
    kwargs = launch.launch_kwargs()
    assert kwargs["max_file_size"] == launch.MAX_FILE_SIZE and "allowed_paths" not in kwargs
    args = launch.parse_args(["--max-job-seconds", "60", "--heartbeat-seconds", "30", "--session-quota-mb", "5"])
    assert (args.max_job_seconds, args.heartbeat_seconds, args.session_quota_mb) == (60, 30, 5)
    args = launch.parse_args(["--bases", "mini, a/b", "--max-loaded-bases", "1", "--max-adapter-mb", "300"])
    assert (args.bases, args.max_loaded_bases, args.max_adapter_mb) == ("mini, a/b", 1, 300)
    assert launch.base_list(args) == ["mini", "a/b"]
    assert launch.base_list(launch.parse_args(["--base", "mini", "--bases", "mini,x/y"])) == ["mini", "x/y"]
    assert launch.base_list(launch.parse_args(["--base", "a/b"])) == ["a/b"]


def test_empty_number_fields_are_named_not_crashes(client):
    session = client.predict(api_name="/new_session")
    with pytest.raises(Exception) as excinfo:
        client.predict(session, "a photo of sks", "", None, 10, 5.0, 64, 64, 1, 1.0, 1.0, 1.0, 0.5,
                       api_name="/generate")
    assert "Seed needs a number" in str(excinfo.value) and "TypeError" not in str(excinfo.value)
    with pytest.raises(Exception) as excinfo:  # an API call is held to the hand-off slider's range, with a message
        client.predict(session, "a photo of sks", "", 0, 10, 5.0, 64, 64, 1, 1.0, 1.0, 0.5, 1.5, api_name="/generate")
    assert "1.5 is greater than maximum value 1" in str(excinfo.value)
