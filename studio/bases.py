"""The base models a studio offers: the operator's list (`--bases`), which of them are loaded, and how they load.

A visitor picks a base by its name in that list, never by a path. Loads are lazy and cached; at most
`max_loaded` bases stay resident, and when another is needed the least recently used one is let go, but only one
that no queued or running job needs (memory policy: a base under a job is never unloaded; when every resident base
is in use, the load is refused with a message instead of going over the limit). No gradio here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zipq_core import plan
from zipq_core.base import BaseModel, free_device_memory, is_offline, load_base
from zipq_core.errors import ZipqError

DEFAULT_MAX_LOADED = 2  # two SDXL pipelines already fill a 24 GB GPU; mini costs nothing
Loader = Callable[[str, str | None], BaseModel]


def parse_bases(text: str | Sequence[str]) -> list[str]:
    """The operator's list: comma-separated specs (mini, hub ids, diffusers folders, .safetensors files)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs = list(dict.fromkeys(s.strip() for s in items if s and s.strip()))
    if not specs:
        raise ZipqError("--bases needs at least one base model, e.g. --bases mini,stabilityai/stable-diffusion-xl-"
                        "base-1.0.")
    return specs


def display_name(spec: str) -> str:
    """What the page shows for a spec: a hub id or 'mini' as is, a local file or folder by its last name only (the
    server's folders are not the visitor's business)."""
    path = Path(spec).expanduser()
    if spec == "mini" or (not path.exists() and spec.count("/") == 1):
        return spec
    return path.name or spec


def is_hub_id(spec: str) -> bool:
    return spec != "mini" and spec.count("/") == 1 and not Path(spec).expanduser().exists()


@dataclass
class Bases:
    """The operator's bases by display name, the loaded ones (least recently used first), their measured speeds.

    Args:
        specs: the operator's list; the first is every new session's base.
        device: "cpu", "cuda" or None (CUDA when present), for every base.
        max_loaded: bases resident at once.
        loader: loads a spec (`load_base`; tests pass a counting one).
    """

    specs: list[str]
    device: str | None = None
    max_loaded: int = DEFAULT_MAX_LOADED
    loader: Loader = load_base
    speed: plan.Speed | None = None  # one measured speed for every base (tests); None: measured per base
    loaded: OrderedDict[str, BaseModel] = field(default_factory=OrderedDict)
    speeds: dict[str, plan.Speed] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        if self.max_loaded < 1:
            raise ZipqError("--max-loaded-bases must be at least 1.")
        self.names: dict[str, str] = {}
        for spec in self.specs:
            name, n = display_name(spec), 1
            while name in self.names:  # two files of one name in different folders
                n += 1
                name = f"{display_name(spec)} ({n})"
            self.names[name] = spec

    @classmethod
    def of(cls, base: BaseModel, speed: plan.Speed | None = None) -> Bases:
        """A one-base studio around a base already loaded."""
        bases = cls([base.spec], device=str(base.device), speed=speed)
        bases.loaded[base.spec] = base
        return bases

    @property
    def default(self) -> str:
        return next(iter(self.names))

    def choices(self) -> list[str]:
        return list(self.names)

    def spec(self, name: str | None) -> str:
        """The spec behind a display name from the list; anything else is refused (a forged API value)."""
        name = (name or "").strip() or self.default
        if name not in self.names:
            raise ZipqError(f"Base model {name!r} is not offered here: choose one of {', '.join(self.names)}.")
        return self.names[name]

    def name_of(self, spec: str) -> str:
        return next((n for n, s in self.names.items() if s == spec), display_name(spec))

    def resident(self, spec: str) -> BaseModel | None:
        with self.lock:
            base = self.loaded.get(spec)
            if base is not None:
                self.loaded.move_to_end(spec)
            return base

    def load(self, spec: str, in_use: Callable[[str], bool], on_line: Callable[[str], None] = lambda line: None
             ) -> BaseModel:
        """The loaded base for `spec`, loading it when needed after letting go of least recently used bases that no
        job needs.

        Args:
            spec: one of `specs`.
            in_use: whether a queued or running job needs a base (by spec).
            on_line: where progress lines go (the load job's log).

        Returns:
            The loaded base.
        """
        if spec not in self.specs:
            raise ZipqError(f"Base model {display_name(spec)!r} is not offered here.")
        with self.lock:
            if (base := self.resident(spec)) is not None:
                return base
            self._make_room(spec, in_use, on_line)
        started = time.time()
        base = self.loader(spec, self.device)  # outside the lock: a download may take minutes
        on_line(f"Loaded {display_name(spec)} ({base.arch}) in {plan.describe(time.time() - started)}.")
        with self.lock:
            self.loaded[spec] = base
            return base

    def _make_room(self, spec: str, in_use: Callable[[str], bool], on_line: Callable[[str], None]) -> None:
        while len(self.loaded) >= self.max_loaded:
            idle = [s for s in self.loaded if not in_use(s)]
            if not idle:
                names = ", ".join(display_name(s) for s in self.loaded)
                raise ZipqError(f"The server holds {len(self.loaded)} base model(s) ({names}), each needed by a "
                                f"queued or running job, and keeps at most {self.max_loaded}: choose "
                                f"{display_name(spec)} again when those jobs are done.")
            self._unload(idle[0])
            on_line(f"Unloaded {display_name(idle[0])} (no job needs it) to make room.")

    def _unload(self, spec: str) -> None:
        """Forget a base here and in the core's cache, so its memory is returned once no caller holds it."""
        from zipq_core import base as core

        gone = self.loaded.pop(spec)
        with core._CACHE_LOCK:  # the core keeps loaded pipelines by spec too; without this the memory stays held
            for key in [k for k, v in core._CACHE.items() if v is gone]:
                del core._CACHE[key]
        self.speeds.pop(spec, None)
        del gone
        free_device_memory()

    def speed_of(self, base: BaseModel) -> plan.Speed:
        """This device's throughput on a base, measured once per base (estimates are per base)."""
        if self.speed is not None:
            return self.speed
        with self.lock:
            if base.spec not in self.speeds:
                self.speeds[base.spec] = plan.measure_speed(base)
            return self.speeds[base.spec]


# ------------------------------------------------------------------------------------------- hub downloads
def hub_cache_folder(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def folder_bytes(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def download_plan(spec: str) -> int | None:
    """Bytes a download of a hub base will fetch, checked against the free disk first (zipq_core.base), or None when
    nothing will be downloaded (a local base, the hub cache already has it, or the machine is offline: the load says
    why)."""
    from zipq_core.base import check_free_disk, download_size

    if not is_hub_id(spec) or is_offline():
        return None
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(spec, local_files_only=True, allow_patterns=["model_index.json"])
        cached = any(hub_cache_folder(spec).rglob("*.safetensors"))
    except Exception:
        cached = False
    if cached:
        return None
    nbytes = download_size(spec, "fp16") or download_size(spec, None) or 0
    check_free_disk(spec, nbytes)
    return nbytes


def watch_download(folder: Path, total: int, report: Callable[[int, int], None], stop: threading.Event,
                   period: float = 1.0) -> threading.Thread:
    """Report the bytes in a hub cache folder (as MB done of MB total) until `stop` is set: the download's progress
    as a job's step line."""
    start = folder_bytes(folder)

    def run() -> None:
        while not stop.wait(period):
            report(min(total, folder_bytes(folder) - start) // 2**20, max(1, total // 2**20))

    thread = threading.Thread(target=run, name="watch-download", daemon=True)
    thread.start()
    return thread
