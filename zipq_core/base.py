"""Base models: resolve a spec (`mini`, hub id, diffusers folder, `.safetensors` file), load it lazily, cache it.

The architecture is read from the loaded components (never guessed from a name): SDXL has a second
text encoder and `text_time` added conditions; SD2 uses linear projections in its transformers; the
rest is SD1.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Arch
from .errors import ZipqError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR.parent / "assets"
MINI_DIR = ASSETS_DIR / "mini"

_CACHE: dict[tuple, BaseModel] = {}
_CACHE_LOCK = threading.Lock()
_MAX_CACHED = 2  # two SDXL pipelines already fill a 24 GB GPU; mini costs nothing


@dataclass
class BaseModel:
    """A loaded pipeline plus what the rest of the core needs to know about it."""

    spec: str  # what the user asked for ("mini", a hub id, a path)
    pipe: object  # a diffusers StableDiffusion(XL)Pipeline
    arch: Arch
    device: torch.device
    dtype: torch.dtype
    lock: threading.RLock  # one job at a time touches the (shared, cached) UNet weights

    @classmethod
    def from_pipeline(cls, spec: str, pipe, device: torch.device, dtype: torch.dtype) -> BaseModel:
        """Wrap a pipeline already in `dtype`: moved to `device`, every model frozen and in eval mode (no stage
        may take gradients for the base's weights: they would be a second copy of it)."""
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False).eval()
        return cls(spec=spec, pipe=pipe, arch=detect_arch(pipe), device=device, dtype=dtype, lock=threading.RLock())

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def is_mini(self) -> bool:
        return self.spec == "mini"

    @property
    def family(self) -> str:
        """The defaults family (config.FAMILY_DEFAULTS): "mini", or the architecture."""
        return "mini" if self.is_mini else self.arch

    @property
    def adapter_dtype(self) -> torch.dtype:
        """How its adapters are stored: fp16 for a base that computes in half precision (half the file, nothing
        lost that its own fp16/bf16 arithmetic keeps; and what ComfyUI/A1111 files hold), fp32 otherwise (mini,
        CPU runs, the exactness of merged == unmerged)."""
        return torch.float16 if self.dtype in (torch.float16, torch.bfloat16) else torch.float32

    @property
    def default_size(self) -> int:
        """The resolution the model was trained at: sample_size latents × VAE factor."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def describe(self) -> str:
        return f"{self.spec} ({self.arch}, {self.device.type}, {str(self.dtype).removeprefix('torch.')})"

    def reload_unet(self) -> None:
        """Load the UNet again from where it came from (after QDoRA quantized it in place for a training)."""
        from diffusers import UNet2DConditionModel

        free_device_memory()
        path = MINI_DIR if self.is_mini else Path(self.spec).expanduser()
        if path.is_dir() or "/" in self.spec and not path.suffix:
            source = str(path) if path.is_dir() else self.spec
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=self.dtype,
                                                        local_files_only=True)
        else:  # a single-file checkpoint: its pipeline is rebuilt on the host, and only the UNet kept
            unet = _load_pipeline(self.spec, self.dtype).unet
        self.pipe.unet = unet.to(self.device).requires_grad_(False).eval()

    def text_encoders_on_device(self, on: bool) -> None:
        """Move the text encoders to the device (to encode prompts) or to the host (while a stage that has
        encoded its prompts trains or merges: on SDXL they hold 1.6 GB). A no-op on the CPU."""
        if self.device.type == "cpu":
            return
        target = self.device if on else torch.device("cpu")
        for encoder in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)):
            if encoder is not None and encoder.device != target:
                encoder.to(target)
        if not on:
            free_device_memory()


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit choice wins (and fails clearly if absent)."""
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ZipqError(f"device {device!r} was asked for but no CUDA GPU is visible: use --device cpu.")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 natively (Ampere, compute capability 8.0, and later).

    `torch.cuda.is_bf16_supported()` answers True on a T4 (7.5), where bf16 is emulated without tensor cores;
    there fp16 (with fp32 adapter weights and a gradient scaler while training) is the fast choice.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """fp32 on CPU (bf16 was slower there without AMX, DESIGN §9); on CUDA bf16 from Ampere on, else fp16."""
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype:
        if dtype not in names:
            raise ZipqError(f"dtype {dtype!r} is unknown: use fp32, fp16 or bf16.")
        return names[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.float32


def detect_arch(pipe) -> Arch:
    """Read the architecture off the components."""
    unet_cfg = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is not None or unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet_cfg.get("use_linear_projection") else "sd1"


def detect_single_file_arch(path: Path) -> Arch:
    """Read the architecture of an original-format checkpoint from its key names (no weights are loaded)."""
    from .single_file import arch_from_keys, read_shapes

    return arch_from_keys(path.name, read_shapes(path))


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load_pipeline(spec: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    if spec == "mini":
        if not (MINI_DIR / "model_index.json").exists():
            raise ZipqError(f"The bundled mini model is missing at {MINI_DIR}: is the checkout complete "
                            "(git lfs is not used; re-clone the repository)?")
        return DiffusionPipeline.from_pretrained(str(MINI_DIR), torch_dtype=dtype, local_files_only=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ZipqError(f"{path} is a folder but not a diffusers pipeline (no model_index.json).")
        return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    if path.suffix in (".ckpt", ".pt", ".bin", ".pth"):
        raise ZipqError(f"{path.name}: only .safetensors checkpoints are accepted (pickled files can run code).")
    if path.suffix == ".safetensors":
        if not path.exists():
            raise ZipqError(f"Checkpoint file {path} does not exist.")
        from .single_file import load_single_file

        return load_single_file(path, dtype)  # configs read off the file's header: no hub needed
    if "/" not in spec or spec.count("/") > 1:
        raise ZipqError(f"Base model {spec!r} is neither 'mini', an existing folder, a .safetensors file nor a "
                        "hub id like 'stabilityai/stable-diffusion-xl-base-1.0'.")
    return _load_hub(spec, dtype)


def _load_hub(repo_id: str, dtype: torch.dtype):
    """A hub pipeline: from the local cache when it is there, else downloaded (its files' total checked against the
    free disk first; huggingface_hub shows the progress). A half-precision base takes the repo's fp16 variant
    where it has one (SDXL: 6.9 GB instead of 13.9 GB)."""
    from diffusers import DiffusionPipeline

    variants = ["fp16", None] if dtype in (torch.float16, torch.bfloat16) else [None]
    cached_error: Exception | None = None
    for variant in variants:  # the local cache first: no network, and it is all an offline machine has
        try:
            return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype, variant=variant,
                                                     local_files_only=True)
        except Exception as e:
            cached_error = cached_error or e
    if is_offline():
        raise ZipqError(f"{repo_id} is not in the local Hugging Face cache and this machine is offline "
                        "(HF_HUB_OFFLINE=1). Use --base mini (bundled), a local diffusers folder or a "
                        ".safetensors file.") from cached_error
    last: Exception | None = None
    for variant in variants:
        files = download_size(repo_id, variant)
        if files is None:  # the repo has no such variant
            continue
        check_free_disk(repo_id, files)
        try:
            return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype, variant=variant)
        except Exception as e:
            last = e
    raise ZipqError(f"Could not download {repo_id}: {type(last).__name__ if last else 'no weights'}: {last}. Without "
                    "network access use --base mini (bundled), a local diffusers folder or a .safetensors file.")


def download_size(repo_id: str, variant: str | None) -> int | None:
    """Bytes of the pipeline files a download of `repo_id` fetches (its components' weights in `variant` and their
    configs), or None when the repo has no weights in that variant. Asks the hub for the file list only."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except Exception as e:
        raise ZipqError(f"Could not find {repo_id} on the Hugging Face hub: {type(e).__name__}: {e}.") from e
    files = [(f.rfilename, f.size or 0) for f in info.siblings or [] if "/" in f.rfilename]  # components only
    weights = [(n, b) for n, b in files if n.endswith(".safetensors")]
    tag = f".{variant}." if variant else None
    chosen = [(n, b) for n, b in weights if (tag in n if tag else ".fp16." not in n)]
    if not chosen:
        return None
    return sum(b for _, b in chosen) + sum(b for n, b in files if n.endswith((".json", ".txt")))


def check_free_disk(repo_id: str, nbytes: int) -> None:
    """Refuse a download the Hugging Face cache's disk cannot hold (with 5 % to spare)."""
    import shutil

    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if nbytes * 1.05 > free:
        raise ZipqError(f"Downloading {repo_id} needs {nbytes / 1e9:.1f} GB in {cache} but only {free / 1e9:.1f} GB "
                        "is free: free some space or point HF_HOME at a larger disk.")


def load_base(spec: str = "mini", device: str | None = None, dtype: str | None = None) -> BaseModel:
    """Load (once) and return a base model.

    Args:
        spec: "mini", a hub id, a local diffusers folder or a single `.safetensors` checkpoint.
        device: "cpu", "cuda", "cuda:1"; None picks CUDA when present.
        dtype: "fp32", "fp16", "bf16"; None picks fp32 on CPU, bf16/fp16 on CUDA.

    Returns:
        The cached `BaseModel`; later calls with the same arguments return the same object.
    """
    spec = str(spec).strip() or "mini"
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    key = (spec, str(dev), str(dt))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        pipe = _load_pipeline(spec, dt)
        if getattr(pipe, "unet", None) is None:
            raise ZipqError(f"{spec} is a {type(pipe).__name__}; only UNet Stable Diffusion pipelines "
                            "(SD1.x, SD2.x, SDXL) are supported.")
        base = BaseModel.from_pipeline(spec, pipe, dev, dt)
        while len(_CACHE) >= _MAX_CACHED:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = base
        return base


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def free_device_memory() -> None:
    """Return freed memory to the device (after a stage, or after running out of memory): CUDA's cached blocks,
    and on the host the C allocator's free pages (glibc keeps freed mid-sized blocks, such as a quantized layer's
    float weight, mapped: an nf4 SDXL UNet would otherwise cost as much host memory as the bf16 one)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim_host_heap()


def _trim_host_heap() -> None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)  # glibc only; elsewhere the symbol is missing
    except (OSError, AttributeError):
        pass


@contextmanager
def out_of_memory(advice: str) -> Iterator[None]:
    """Turn a device out-of-memory error into a `ZipqError` that says what to lower, after freeing the memory.

    The failed stage's tensors are released before the message leaves, so the process keeps serving.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        pass  # leave the except block first: its traceback holds the failed stage's tensors alive
    else:
        return
    free_device_memory()
    raise ZipqError(f"The GPU ran out of memory: {advice}.")
