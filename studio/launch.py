"""Starting the studio: flags, the app object, `launch()`.

    python app.py [--host 0.0.0.0] [--port 7860] [--bases mini,stabilityai/stable-diffusion-xl-base-1.0,x.safetensors]
                  [--work-dir runs/sessions] [--max-job-seconds N] …

Nothing is loaded at import time; `create_app` loads the first base model, measures the device once on it (for
estimates) and builds the page. The other bases load when a visitor first chooses one (studio.bases).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from zipq_core import plan
from zipq_core.base import is_offline
from zipq_core.errors import ZipqError
from zipq_core.jobs import JobRegistry, Limits

from .bases import DEFAULT_MAX_LOADED, Bases, parse_bases
from .flow import MAX_ADAPTER_BYTES, ROOT, Studio
from .handlers import Handlers
from .sessions import MAX_IMAGE_BYTES, Quota

DEFAULT_WORK_DIR = ROOT / "runs" / "sessions"
MAX_FILE_SIZE = "20mb"
MINI_ADAPTER_MB = 64  # the upload limit of a Space that offers mini alone (its adapters are a few MB)
# A job may cost this many device-seconds by default: on a CPU the mini flow's longest job takes under a minute;
# a real base on a small GPU legitimately trains for an hour (the operator sets --max-job-seconds per deployment).
DEFAULT_BUDGET_S = {"cpu": 600.0, "cuda": 3600.0}


def create_app(base_spec: str | Sequence[str] = "mini", work_dir: str | Path = DEFAULT_WORK_DIR,
               device: str | None = None, limits: Limits = Limits(), budget_s: float | None = None,
               quota: Quota | None = None, trust_proxy: bool = False, speed: plan.Speed | None = None,
               max_loaded_bases: int = DEFAULT_MAX_LOADED, max_adapter_bytes: int = MAX_ADAPTER_BYTES):
    """Load the first base model and build the app.

    Args:
        base_spec: the bases a visitor may choose from, comma-separated or a list (the first is the default): each
            "mini", a hub id, a diffusers folder or a .safetensors file.
        work_dir: where the per-session folders (and the job store) live.
        device: "cpu", "cuda"; None picks CUDA when present.
        limits: sessions, queue, heartbeat and time-to-live (zipq_core.jobs.Limits).
        budget_s: device-seconds per job (None: DEFAULT_BUDGET_S for the device).
        quota: disk per session and in all.
        trust_proxy: read the client address from X-Forwarded-For (behind a Space's proxy).
        speed: the device's throughput (None: measured per base, the first one now).
        max_loaded_bases: bases resident at once (the least recently used one no job needs is let go).
        max_adapter_bytes: the largest adapter file a visitor may import.

    Returns:
        (the Blocks app, the Studio behind it).
    """
    from .page import build_ui, wire

    bases = Bases(parse_bases(base_spec), device=device, max_loaded=max_loaded_bases, speed=speed)
    registry = JobRegistry(root=Path(work_dir), limits=limits)
    registry.cleanup()
    studio = Studio(bases, registry, quota=quota, max_adapter_bytes=max_adapter_bytes)
    base = studio.base  # the first base loads now: a wrong spec fails at launch, not on a visitor's click
    studio.bases.speed_of(base)  # measured now, on the default base (the others when first loaded)
    studio.budget_s = budget_s if budget_s is not None else DEFAULT_BUDGET_S.get(base.device.type, math.inf)
    # The page's copy of the session id is encrypted with a key derived from the server's session key.
    demo, ui = build_ui(base, registry.keys.browser_secret(), cache_ttl_s=limits.ttl_s, bases=bases.choices())
    wire(demo, ui, Handlers(studio, trust_proxy=trust_proxy))
    demo.queue(default_concurrency_limit=8)
    return demo, studio


def launch_kwargs(**overrides) -> dict:
    """What `launch()` needs besides host/port: the theme and the upload limit. No `allowed_paths`: the work folder
    is never served; files reach the page as published copies (studio.handlers.publish)."""
    import gradio as gr

    return {"theme": gr.themes.Soft(), "max_file_size": MAX_FILE_SIZE, "show_error": True, **overrides}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Limits()
    p = argparse.ArgumentParser(description="ZipQDoRA Studio: train, merge and generate in the browser.")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or
                   ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"), help="interface to listen on")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet access)")
    p.add_argument("--auth", default=None, help="user:password required to open the page")
    p.add_argument("--base", default=None, help="one base model: mini (bundled), a hub id, a diffusers folder or a "
                                                "single .safetensors checkpoint")
    p.add_argument("--bases", default=os.environ.get("ZIPQ_BASES"),
                   help="the base models a visitor may choose from, comma-separated, the first being the default "
                        "(e.g. mini,stabilityai/stable-diffusion-xl-base-1.0,/models/x.safetensors); on a Space set "
                        "the ZIPQ_BASES variable. Visitors pick from this list only, never a path of their own")
    p.add_argument("--max-loaded-bases", type=int, default=DEFAULT_MAX_LOADED,
                   help="base models kept loaded at once; the least recently used one that no queued or running job "
                        "needs is unloaded to make room")
    p.add_argument("--max-adapter-mb", type=float, default=None,
                   help="the largest adapter file a visitor may upload ('Use an existing LoRA'; real SDXL LoRAs are "
                        f"50-900 MB); it counts in the session's disk quota (default: {MAX_ADAPTER_BYTES // 2**20} "
                        f"with a real base, {MINI_ADAPTER_MB} when mini is the only one)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="per-session folders and the job store")
    p.add_argument("--ttl-hours", type=float, default=d.ttl_s / 3600,
                   help="remove sessions (files, jobs, uploads) unused for this long")
    p.add_argument("--max-job-seconds", type=float, default=None,
                   help="device-seconds one job may cost: longer requests are refused with what to lower, and a job "
                        "past it while others wait is stopped (default: 600 on CPU, 3600 on a GPU)")
    p.add_argument("--heartbeat-seconds", type=float, default=d.heartbeat_s,
                   help="a session's jobs stop when no page or client asked about it for this long")
    p.add_argument("--session-quota-mb", type=float, default=Quota().session_bytes / 2**20,
                   help="disk one session may use")
    p.add_argument("--max-disk-gb", type=float, default=Quota().total_bytes / 2**30, help="disk all sessions may use")
    p.add_argument("--sessions-per-address", type=int, default=d.sessions_per_address,
                   help="live sessions one client address may hold")
    p.add_argument("--max-queued", type=int, default=d.max_queued, help="jobs waiting or running, all sessions")
    p.add_argument("--trust-proxy", action="store_true", default=bool(os.environ.get("SPACE_ID")),
                   help="take the client address from X-Forwarded-For (default on a Hugging Face Space)")
    return p.parse_args(argv)


def adapter_limit_mb(args: argparse.Namespace) -> float:
    """--max-adapter-mb, else what the offered bases need: every upload may be that large (gradio has one limit for
    all files), so a Space that offers mini alone, whose adapters are a few MB, keeps a small one."""
    if args.max_adapter_mb is not None:
        return args.max_adapter_mb
    return MINI_ADAPTER_MB if set(base_list(args)) == {"mini"} else MAX_ADAPTER_BYTES / 2**20


def base_list(args: argparse.Namespace) -> list[str]:
    """The bases offered: --bases (or ZIPQ_BASES) when given, else the one --base (scripts/run.sh passes --base mini,
    so a list given after it wins), else mini."""
    return parse_bases(args.bases or args.base or "mini")


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

    if is_offline():
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
        limits = Limits(heartbeat_s=args.heartbeat_seconds, ttl_s=args.ttl_hours * 3600,
                        sessions_per_address=args.sessions_per_address, max_queued=args.max_queued)
        quota = Quota(session_bytes=int(args.session_quota_mb * 2**20), total_bytes=int(args.max_disk_gb * 2**30))
        demo, _ = create_app(base_list(args), args.work_dir, args.device, limits=limits,
                             budget_s=args.max_job_seconds, quota=quota, trust_proxy=args.trust_proxy,
                             max_loaded_bases=args.max_loaded_bases,
                             max_adapter_bytes=int(adapter_limit_mb(args) * 2**20))
    except ZipqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Gradio's upload limit is one for every file: the adapters' (images are held to theirs by the app).
    upload_limit = f"{max(adapter_limit_mb(args), MAX_IMAGE_BYTES / 2**20):.0f}mb"
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                **launch_kwargs(max_file_size=upload_limit))
    return 0
