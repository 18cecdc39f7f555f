"""What several test files share: adapters and UNet outputs to compare, bad and unusual image files, a client that
waits for jobs, benchmarks imported as they run.

The image writers build everything on the fly with Pillow, small and fast; the "huge" images are tiny PNGs whose
header claims a huge size, which is exactly what a decompression bomb looks like.
"""

from __future__ import annotations

import importlib
import io
import socket
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from zipq_core.adapters import Adapter, LoraLayer, row_norm
from zipq_core.encode import Conditioning, unet_forward


@contextmanager
def bench_module(name: str) -> Iterator[ModuleType]:
    """A benchmark of bench/ imported as when it runs: its folder first on the import path (it imports its sibling
    `common`), taken off again afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
        yield importlib.import_module(name)


def png_with_header_size(path: Path, width: int, height: int) -> Path:
    """Write a tiny valid PNG, then rewrite its IHDR so the header claims width × height.

    Args:
        path: where to write.
        width: the claimed width in pixels.
        height: the claimed height in pixels.

    Returns:
        The path written.
    """
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # PNG layout: 8-byte signature, then IHDR: length (4) | b"IHDR" (4) | width, height (4 + 4) | … | CRC (4)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def truncated_jpeg(path: Path, size: tuple[int, int] = (128, 128)) -> Path:
    """Write a JPEG cut off halfway, as an interrupted upload leaves it."""
    buffer = io.BytesIO()
    noise = Image.effect_noise(size, 64).convert("RGB")  # noise so the scan data is long enough to cut
    noise.save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_broken_files(folder: Path) -> dict[str, str]:
    """Write one file of every kind the data stage must skip.

    Args:
        folder: an existing folder (e.g. a copy of an example subject).

    Returns:
        File name → a keyword the rejection reason must contain.
    """
    folder = Path(folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not a picture\n")
    truncated_jpeg(folder / "cut_off.jpg")
    Image.new("RGB", (40, 300), (200, 40, 40)).save(folder / "tiny.png")
    png_with_header_size(folder / "huge.png", 10_000, 6_000)  # 60 MP: over the 50 MP limit
    png_with_header_size(folder / "bomb.png", 30_000, 30_000)  # 900 MP: Pillow's own bomb guard fires
    return {
        "empty.jpg": "empty",
        "notes.png": "not an image",
        "cut_off.jpg": "truncated",
        "tiny.png": "too small",
        "huge.png": "too large",
        "bomb.png": "too large",
    }

def random_layer(out: int, inp: int, r: int, dora: bool, seed: int, conv: bool = False) -> LoraLayer:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((r, inp, 3, 3) if conv else (r, inp), generator=g) * 0.2
    up = torch.randn((out, r, 1, 1) if conv else (out, r), generator=g) * 0.2
    mag = torch.rand(out, generator=g) + 0.5 if dora else None
    return LoraLayer(down=down, up=up, scale=0.5, magnitude=mag)


def adapter_for(unet: torch.nn.Module, dora: bool, seed: int) -> Adapter:
    layers = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_v")) and isinstance(module, torch.nn.Linear):
            out, inp = module.weight.shape
            layer = random_layer(out, inp, 4, dora, seed + len(layers))
            if dora:  # a magnitude near the base norms, as training leaves it
                layer.magnitude = row_norm(module.weight.float()) * (1 + 0.1 * torch.rand(out))
            layers[f"unet.{name}"] = layer
    return Adapter(layers=layers, use_dora=dora, info={"kind": "subject", "token": "sks"})


def unet_out(base, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    unet = base.unet
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    hidden = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    pooled = time_ids = None
    if c.addition_embed_type == "text_time":
        pooled = torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g)
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    with torch.no_grad():
        return unet_forward(unet, x, torch.tensor([500, 500]), Conditioning(hidden, pooled, time_ids))


FINISHED = ("done", "failed", "cancelled", "interrupted")


def wait_jobs(client, session: str, timeout: float = 120.0) -> list[dict]:
    """Poll the job-status endpoint until every job of the session has finished."""
    import time

    deadline = time.time() + timeout
    jobs = []
    while time.time() < deadline:
        jobs = client.predict(session, api_name="/job_status")["jobs"]
        if jobs and all(j["status"] in FINISHED for j in jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"jobs did not finish in {timeout} s: {jobs}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(work_dir: Path, **options):
    """The Studio on mini, served in-process on a free port: (url, demo, studio)."""
    from studio.launch import create_app, launch_kwargs

    demo, studio = create_app("mini", work_dir=work_dir, **options)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_kwargs())
    return f"http://127.0.0.1:{port}/", demo, studio
