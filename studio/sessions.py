"""A visitor's session on disk: where its things live, what it remembers, what it may hold. No gradio here.

    <work dir>/<session id>/
        settings.json                 its base model, the words that name its concepts, its whole-flow jobs
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
PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"  # peft's save_pretrained
MAX_IMAGE_BYTES = 20 * 2**20  # one image upload (the page's upload limit is the adapters' larger one)


@dataclass
class Settings:
    """What a session remembers besides its files: the words that name its concepts, its flow's jobs."""

    subject_token: str = SUBJECT_TOKEN
    class_noun: str = ""
    style_token: str = STYLE_TOKEN
    style_noun: str = ""
    flow_jobs: tuple[str, ...] = ()
    base: str = ""  # the base model's name in the operator's list ("": the first); adapters are made on it
    formats: dict[str, str] = field(default_factory=dict)  # "train"/"merged" → the download format chosen

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
    def klora(self) -> Path:
        """Present when the session's latest merge is K-LoRA: generation then picks each layer's adapter per step."""
        return inside(self.root, "adapters", "klora.json")

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
        if suffix in IMAGE_SUFFIXES and p.stat().st_size > MAX_IMAGE_BYTES:
            out.ignored.append(f"{p.name}: {p.stat().st_size / 2**20:.0f} MB, over the {MAX_IMAGE_BYTES // 2**20} MB "
                               "limit per image (a JPEG or a smaller PNG of it will do)")
        elif suffix in IMAGE_SUFFIXES:
            out.keep.append(p)
        elif suffix == CAPTION_SUFFIX and p.stem.lower() in stems:
            out.keep.append(p)
        elif suffix == CAPTION_SUFFIX:
            out.ignored.append(f"{p.name}: a caption file with no image named {p.stem}")
        else:
            out.ignored.append(f"{p.name}: not an image (PNG, JPEG, WebP…) or a caption file")
    return out


@dataclass
class AdapterUpload:
    """An uploaded adapter: its .safetensors file and peft's adapter_config.json when one came with it."""

    weights: Path
    config: Path | None = None

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.weights, self.config) if p is not None)


def sort_adapter_upload(files: Sequence[str | Path]) -> AdapterUpload:
    """Exactly one .safetensors file (and at most one adapter_config.json), or a message saying what to send."""
    paths = [Path(f) for f in files]
    weights = [p for p in paths if p.suffix.lower() == ".safetensors"]
    configs = [p for p in paths if p.suffix.lower() == ".json"]
    others = [p.name for p in paths if p not in weights and p not in configs]
    if others:
        raise ZipqError(f"{', '.join(others)}: adapters are taken as .safetensors files only (pickled .ckpt/.pt/"
                        ".bin files can run code), with peft's adapter_config.json beside one if it has one.")
    if len(weights) != 1 or len(configs) > 1:
        raise ZipqError(f"Send one adapter: one .safetensors file (got {len(weights)}), optionally with its "
                        "adapter_config.json.")
    if configs and configs[0].name != PEFT_CONFIG_NAME:
        raise ZipqError(f"{configs[0].name}: the only JSON file taken is peft's {PEFT_CONFIG_NAME}.")
    return AdapterUpload(weights[0], configs[0] if configs else None)


def stage_adapter_upload(upload: AdapterUpload, folder: Path) -> Path:
    """Copy an adapter upload into `folder`: the file alone, or a peft folder (weights + adapter_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    if upload.config is None:
        target = inside(folder, "adapter.safetensors")
        shutil.copyfile(upload.weights, target)
        return target
    shutil.copyfile(upload.weights, inside(folder, PEFT_WEIGHTS_NAME))
    shutil.copyfile(upload.config, inside(folder, PEFT_CONFIG_NAME))
    return folder


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
def weights_digest(folder: Path) -> str:
    path = folder / WEIGHTS_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""


def record_made_from(paths: SessionPaths) -> None:
    """Note which subject and style adapters the merged adapter was made from (a later training keeps the merge
    but the page says it is out of date)."""
    made = {kind: weights_digest(paths.adapter(kind)) for kind in ("subject", "style")}
    (paths.merged / MADE_FROM).write_text(json.dumps(made))


def merged_is_current(paths: SessionPaths) -> bool:
    """Whether the merged adapter was made from the session's present subject and style adapters."""
    try:
        made = json.loads((paths.merged / MADE_FROM).read_text())
    except (OSError, ValueError):
        return True  # merged before this was recorded: nothing to compare
    return all(made.get(kind) == weights_digest(paths.adapter(kind)) for kind in ("subject", "style"))


def usage(paths: SessionPaths) -> tuple[int, int]:
    return folder_usage(paths.root)
