"""A visitor's session on disk: where its things live, what it remembers, what it may hold. No gradio here.

    <work dir>/<session id>/
        settings.json                 the words that name its concepts, its whole-flow jobs
        subject/images, style/images  the accepted uploads (and their caption sidecars)
        adapters/subject, …/style     trained adapters (zipq_core.adapters.folder layout)
        adapters/merged               the merged adapter (+ made_from.json: which adapters it was made from)
        outputs/                      generated PNGs
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from zipq_core.adapters import WEIGHTS_NAME, has_adapter
from zipq_core.config import check_noun, check_token
from zipq_core.errors import ZipqError
from zipq_core.jobs import folder_usage, inside

SUBJECT_TOKEN, STYLE_TOKEN = "sks", "zkz"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                            ".heic", ".heif"})  # the last two are refused by the data stage with a hint
CAPTION_SUFFIX = ".txt"
MADE_FROM = "made_from.json"


@dataclass
class Settings:
    """What a session remembers besides its files: the words that name its concepts, its flow's jobs."""

    subject_token: str = SUBJECT_TOKEN
    class_noun: str = ""
    style_token: str = STYLE_TOKEN
    style_noun: str = ""
    flow_jobs: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        noun = f" {self.class_noun}" if self.class_noun else ""
        return f"a photo of {self.subject_token}{noun} in {self.style_token} style"

    def token(self, kind: str) -> str:
        return self.subject_token if kind == "subject" else self.style_token

    def noun(self, kind: str) -> str:
        return self.class_noun if kind == "subject" else self.style_noun

    def with_words(self, kind: str, token: str, noun: str) -> Settings:
        """These settings with a concept's words replaced, validated with the core's messages."""
        token, noun = (token or "").strip(), (noun or "").strip()
        check_token(token, f"The {kind} token")
        check_noun(noun, "The class noun" if kind == "subject" else "What the style images show")
        if kind == "subject":
            return replace(self, subject_token=token, class_noun=noun)
        return replace(self, style_token=token, style_noun=noun)


@dataclass(frozen=True)
class SessionPaths:
    """Where one session keeps things under its work folder; every path is checked to stay inside it."""

    root: Path

    def images(self, kind: str) -> Path:
        return inside(self.root, kind, "images")

    def adapter(self, kind: str) -> Path:
        return inside(self.root, "adapters", kind)

    @property
    def merged(self) -> Path:
        return inside(self.root, "adapters", "merged")

    @property
    def outputs(self) -> Path:
        return inside(self.root, "outputs")

    @property
    def settings_file(self) -> Path:
        return inside(self.root, "settings.json")

    def file(self, relative: str) -> Path:
        """A file of this session named relative to its folder (a job's artifact)."""
        return inside(self.root, relative)

    def has_adapter(self, kind: str) -> bool:
        return has_adapter(self.merged if kind == "merged" else self.adapter(kind))

    def read_settings(self) -> Settings:
        try:
            data = json.loads(self.settings_file.read_text())
            data["flow_jobs"] = tuple(data.get("flow_jobs", ()))
            return Settings(**data)
        except (OSError, ValueError, TypeError):
            return Settings()

    def write_settings(self, settings: Settings) -> None:
        self.settings_file.write_text(json.dumps(asdict(settings), indent=1))


# ------------------------------------------------------------------------------------------------ quotas
@dataclass(frozen=True)
class Quota:
    """What one session may keep on disk, and what all of them may together."""

    session_bytes: int = 1024 * 2**20
    session_files: int = 2000
    total_bytes: int = 50 * 2**30

    def check(self, session_usage: tuple[int, int], total_bytes: int, incoming_bytes: int = 0,
              incoming_files: int = 0) -> None:
        used, files = session_usage
        if used + incoming_bytes > self.session_bytes or files + incoming_files > self.session_files:
            raise ZipqError(f"This session holds {used / 2**20:.0f} MB in {files} files; its limit is "
                            f"{self.session_bytes / 2**20:.0f} MB and {self.session_files} files. Start a new session "
                            "('New session' at the top) to go on; download what you want to keep first.")
        if total_bytes + incoming_bytes > self.total_bytes:
            raise ZipqError("The studio's disk is full right now: try again later (old sessions are removed as "
                            "they expire).")


# ----------------------------------------------------------------------------------------------- uploads
@dataclass
class Uploads:
    """Uploaded files sorted into what is kept (images, caption sidecars of those images) and what is not."""

    keep: list[Path] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # "name: why" lines

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.keep)


def sort_uploads(files: Sequence[str | Path]) -> Uploads:
    """Keep image files and the `.txt` sidecars whose name matches an uploaded image; note everything else."""
    paths = [Path(f) for f in files]
    stems = {p.stem.lower() for p in paths if p.suffix.lower() in IMAGE_SUFFIXES}
    out = Uploads()
    for p in paths:
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            out.keep.append(p)
        elif suffix == CAPTION_SUFFIX and p.stem.lower() in stems:
            out.keep.append(p)
        elif suffix == CAPTION_SUFFIX:
            out.ignored.append(f"{p.name}: a caption file with no image named {p.stem}")
        else:
            out.ignored.append(f"{p.name}: not an image (PNG, JPEG, WebP…) or a caption file")
    return out


def stage_uploads(files: Sequence[Path], folder: Path) -> Path:
    """Copy uploads into a fresh staging folder beside `folder`, keeping their names (a repeated name gets a
    numeric suffix). `commit_staged` swaps it in; a refused upload leaves the earlier images untouched."""
    staging = folder.with_name(folder.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for src in files:
        dst, n = inside(staging, src.name), 1
        while dst.exists():
            n += 1
            dst = inside(staging, f"{src.stem}_{n}{src.suffix}")
        shutil.copyfile(src, dst)
    return staging


def commit_staged(staging: Path, folder: Path, rejected: Sequence[str]) -> None:
    """Replace `folder` with the staged uploads, without the files the data stage rejected."""
    for name in rejected:
        inside(staging, name).unlink(missing_ok=True)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def discard_staged(folder: Path) -> None:
    shutil.rmtree(folder.with_name(folder.name + ".staging"), ignore_errors=True)


# ------------------------------------------------------------------------------------------ merged state
def _weights_digest(folder: Path) -> str:
    path = folder / WEIGHTS_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""


def record_made_from(paths: SessionPaths) -> None:
    """Note which subject and style adapters the merged adapter was made from (a later training keeps the merge
    but the page says it is out of date)."""
    made = {kind: _weights_digest(paths.adapter(kind)) for kind in ("subject", "style")}
    (paths.merged / MADE_FROM).write_text(json.dumps(made))


def merged_is_current(paths: SessionPaths) -> bool:
    """Whether the merged adapter was made from the session's present subject and style adapters."""
    try:
        made = json.loads((paths.merged / MADE_FROM).read_text())
    except (OSError, ValueError):
        return True  # merged before this was recorded: nothing to compare
    return all(made.get(kind) == _weights_digest(paths.adapter(kind)) for kind in ("subject", "style"))


def usage(paths: SessionPaths) -> tuple[int, int]:
    return folder_usage(paths.root)
