"""What a job will cost before it runs, in device-seconds: the budgets of a shared server (jobs.Limits) and the
estimates a visitor sees come from here.

The cost of a UNet (or VAE decoder) pass is counted, not guessed: the model is built from its config on PyTorch's
`meta` device (no memory, no compute) and run under `FlopCounterMode`, which counts the multiply-adds of every
convolution, projection and attention product at the exact size asked for (attention grows with the square of the
pixels, so a 2048 px request on a 64 px model is ~14,000× one at 64 px, not 1,000×). One timed pass at the
model's native size on the real device turns FLOPs into seconds (`Speed`). Each stage's estimate is then
passes × FLOPs per pass / throughput:
- training: per step, batch × (2 with prior preservation) samples, forward + backward ≈ 3 forwards; each preview
  (every `sample_every` steps) and each prior-preservation class image a guided generation and a decode;
- merging (learned): per step and concept, batch × (1 teacher forward + 1 merged forward and backward);
- generating: rounds (candidates) × steps × images × 2 (classifier-free guidance) forwards, a VAE decode per
  image and round, and the judges' 2 × levels × noises forwards per candidate.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .config import TRAIN_SAMPLE_STEPS, GenerateConfig, MergeConfig, TrainConfig

_FLOPS: dict[tuple, float] = {}
_FLOPS_LOCK = threading.Lock()
JUDGE_PASSES = 2 * 4 * 2  # base and adapter × levels × noises (generation.rerank.evidence's defaults)
TRAIN_PASSES = 3.0  # a forward and a backward (≈ 2 forwards) per sample
SETUP_S = 2.0  # encoding images and prompts, attaching the adapter


def _config_key(config) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in dict(config).items()))


def _count(kind: str, config, height: int, width: int) -> float:
    """FLOPs of one pass at batch 1, counted on the meta device; cached per (model config, size)."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (kind, _config_key(config), height, width)
    with _FLOPS_LOCK:
        if key in _FLOPS:
            return _FLOPS[key]
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        if kind == "unet":
            model = UNet2DConditionModel.from_config(config)
            x = torch.zeros(1, model.config.in_channels, height, width)
            text = torch.zeros(1, 77, model.config.cross_attention_dim)
            added = None
            if model.config.addition_embed_type == "text_time":
                pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
                added = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
            with FlopCounterMode(display=False) as counter:
                model(x, torch.zeros(1), encoder_hidden_states=text, added_cond_kwargs=added)
        else:
            model = AutoencoderKL.from_config(config)
            z = torch.zeros(1, model.config.latent_channels, height, width)
            with FlopCounterMode(display=False) as counter:
                model.decode(z)
    flops = float(counter.get_total_flops())
    with _FLOPS_LOCK:
        _FLOPS[key] = flops
    return flops


def unet_flops(base, width_px: int, height_px: int) -> float:
    """FLOPs of one UNet forward at batch 1 for an image of width × height pixels."""
    f = base.pipe.vae_scale_factor
    return _count("unet", base.pipe.unet.config, height_px // f, width_px // f)


def decode_flops(base, width_px: int, height_px: int) -> float:
    """FLOPs of one VAE decode at batch 1."""
    f = base.pipe.vae_scale_factor
    return _count("vae", base.pipe.vae.config, height_px // f, width_px // f)


@dataclass(frozen=True)
class Speed:
    """This device's measured throughput on this base (FLOP/s of a UNet forward at the native size)."""

    flops_per_second: float

    def seconds(self, flops: float) -> float:
        return flops / self.flops_per_second


def measure_speed(base, repeats: int = 5, at_least: int = 2, within_s: float = 2.0) -> Speed:
    """Time UNet forwards at the base's native size (after one warm-up) and return the throughput of the fastest.

    The fastest of several: one forward slowed by another process sharing the cores would make every estimate
    too long, and a request well within the budget would be refused. Up to `repeats` of them, but no more than
    `at_least` once the timed ones add up to `within_s`: a full-size UNet on a CPU takes many seconds a forward."""
    from .encode import encode_text, unet_forward

    size = base.default_size
    f = base.pipe.vae_scale_factor
    cond = encode_text(base, [""], size)
    x = torch.zeros(1, base.unet.config.in_channels, size // f, size // f, device=base.device, dtype=base.dtype)
    t = torch.full((1,), 500, device=base.device)
    with base.lock, torch.inference_mode():
        unet_forward(base.unet, x, t, cond)
        times: list[float] = []
        while len(times) < repeats and (len(times) < at_least or sum(times) < within_s):
            if base.device.type == "cuda":
                torch.cuda.synchronize(base.device)
            started = time.perf_counter()
            unet_forward(base.unet, x, t, cond)
            if base.device.type == "cuda":
                torch.cuda.synchronize(base.device)
            times.append(time.perf_counter() - started)
        best = min(times)
    return Speed(unet_flops(base, size, size) / max(best, 1e-6))


def train_seconds(base, cfg: TrainConfig, speed: Speed) -> float:
    """Estimated seconds of a training (from step 0) on this device, its previews included."""
    pass_flops = unet_flops(base, cfg.resolution, cfg.resolution)
    samples = cfg.batch_size * (2 if cfg.prior_preservation else 1)
    image = TRAIN_SAMPLE_STEPS * 2 * pass_flops + decode_flops(base, cfg.resolution, cfg.resolution)  # guided
    images = (cfg.num_class_images if cfg.prior_preservation else 0) \
        + (cfg.steps // cfg.sample_every if cfg.sample_every else 0)  # class images, previews
    return SETUP_S + speed.seconds(cfg.steps * samples * TRAIN_PASSES * pass_flops + images * image)


def merge_seconds(base, cfg: MergeConfig, speed: Speed) -> float:
    """Estimated seconds of a merge (training-free methods: a few seconds of tensor work)."""
    if not cfg.learned:
        return SETUP_S
    size = base.default_size
    forwards = 2 * (1 + TRAIN_PASSES)  # per concept: its teacher, then the merged model forward and backward
    forwards += 2 if cfg.balance == "relative" else 0  # the base's own prediction on each concept's batch
    forwards += TRAIN_PASSES if cfg.keep_subject else 0  # the subject's images under the combined prompt
    per_step = cfg.batch_size * forwards * unet_flops(base, size, size)
    return SETUP_S + speed.seconds(cfg.steps * per_step)


def generate_seconds(base, cfg: GenerateConfig, adapters: int, speed: Speed) -> float:
    """Estimated seconds of a generation request with `adapters` active adapters (their judges pick candidates)."""
    rounds = cfg.candidates if adapters else 1
    guided = 2 if cfg.guidance > 1 else 1
    denoise = rounds * cfg.steps * cfg.num_images * guided * unet_flops(base, cfg.width, cfg.height)
    decode = rounds * cfg.num_images * decode_flops(base, cfg.width, cfg.height)
    judges = adapters * rounds * cfg.num_images * JUDGE_PASSES * unet_flops(base, cfg.width, cfg.height) \
        if rounds > 1 else 0.0
    return speed.seconds(denoise + decode + judges)


def describe(seconds: float) -> str:
    """'12 s', '4.5 min', '1.2 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------------------
# Memory: the peak a stage needs on the device, counted before it runs
# ---------------------------------------------------------------------------------------------------------
# What is counted, not guessed: the weights each stage keeps on the device (parameter bytes of the loaded modules;
# a quantized UNet's linear layers at their storage size), the adapter's trainable state (fp32 factors, gradients,
# optimizer moments), and the activations: the stage's UNet passes are replayed on PyTorch's `meta` device under a
# dispatch mode that adds up every tensor alive at each moment (`_LiveBytes`), with the adapter attached as the
# stage attaches it (peft for training, live layers for a merge), checkpointing as configured, and attention by
# the fused kernel both the CPU and CUDA use (no [tokens × tokens] matrix). That count matches the tensors the
# stages allocate to within 1 % (tests/core/test_plan.py on mini, bench/real_scale.py at full size). Three
# constants per device kind cover what no tensor shows: kernels' scratch buffers and the allocator's slack, which
# grow with the activations and with the weights, and a fixed part (CUDA's context).
GIB = 1024**3
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4 bits plus an fp32 absmax per block of 64
INT8_BYTES_PER_WEIGHT = 1.0
ADAM_STATE_BYTES = {"adamw": 16, "adamw8bit": 10}  # fp32 factor + fp32 gradient + two moments (8-bit: 1 B each)
# CPU: fitted by `bench/real_scale.py --fit` to the process's resident peak (SD1.5 training at 256/384 px and
# generation at 256 px, SDXL training and generation at 512/768 px; never the scored rows), for the smallest worst
# relative error (5.6 % on those rows). The resident peak holds
# what glibc keeps of freed blocks, hence the large factors; the count itself matches the tensors allocated to
# within 5 % on every row (`count_error` in bench/results/real_scale_cpu.json). CUDA: not fitted (no GPU
# was available to this project's measurements): the count, plus 10 % of the activations for the caching
# allocator's fragmentation and 0.45 GB for the CUDA context and cuDNN's workspace; refit on a GPU with
# `bench/real_scale.py --role fit` then `--fit`.
ACTIVATION_FACTOR = {"cpu": 1.76, "cuda": 1.1}
WEIGHT_SLACK = {"cpu": 0.17, "cuda": 0.0}  # × (weights + adapter)
OVERHEAD_GB = {"cpu": 0.0, "cuda": 0.45}
USABLE_FRACTION = 0.95  # of the device's total memory a job may plan to use

_ACTIVATIONS: dict[tuple, float] = {}


@dataclass(frozen=True)
class MemoryPlan:
    """The estimated peak device memory of one job, and what would bring it down."""

    stage: str
    weights_gb: float
    adapter_gb: float
    activations_gb: float
    overhead_gb: float
    device_gb: float | None  # the device's total memory, when known
    lower: str  # what to change when it does not fit
    moment: str = ""  # when the stage reaches its peak
    # every moment of the stage before the constants: (what, weights GB, adapter GB, counted activations GB); the
    # peak is the largest once the constants apply (bench/real_scale.py fits them on these)
    moments: tuple[tuple[str, float, float, float], ...] = ()

    @property
    def peak_gb(self) -> float:
        return self.weights_gb + self.adapter_gb + self.activations_gb + self.overhead_gb

    @property
    def fits(self) -> bool:
        return self.device_gb is None or self.peak_gb <= USABLE_FRACTION * self.device_gb

    def describe(self) -> str:
        of = f" of {self.device_gb:.3g} GB" if self.device_gb else ""
        when = f" while {self.moment}" if self.moment else ""
        return (f"needs about {self.peak_gb:.1f} GB{of}{when} (weights {self.weights_gb:.1f}, adapter "
                f"{self.adapter_gb:.2f}, activations {self.activations_gb:.1f})")

    def as_dict(self) -> dict:
        return {"stage": self.stage, "peak_gb": round(self.peak_gb, 3), "weights_gb": round(self.weights_gb, 3),
                "adapter_gb": round(self.adapter_gb, 3), "activations_gb": round(self.activations_gb, 3),
                "overhead_gb": round(self.overhead_gb, 3), "device_gb": self.device_gb, "fits": self.fits,
                "moment": self.moment}


def device_memory_gb(device: torch.device) -> float | None:
    """Total memory of a CUDA device; None elsewhere (the CPU's memory is the operator's business)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB


def plan_memory(base, stage: str, *, train: TrainConfig | None = None, merge: MergeConfig | None = None,
                generate: GenerateConfig | None = None, adapters: int = 1, adapter_params: int | None = None,
                device_gb: float | None = None, encoders_on_device: bool | None = None,
                images: int = 8) -> MemoryPlan:
    """The peak device memory of a training, merge or generation on `base` with these settings.

    Args:
        base: the loaded base (only its configs and parameter counts are read; nothing runs on it).
        stage: "train", "merge" or "generate".
        train, merge, generate: the stage's config (a merge also reads `train` for the adapters' targets and rank
            when `adapter_params` is not given).
        adapters: adapters applied while generating.
        adapter_params: the adapters' parameter count per adapter, when known (a merge of existing files).
        device_gb: the device's memory (default: asked from the device).
        encoders_on_device: whether the text encoders stay on the device while training or merging (default: on
            the CPU, where host and device are one memory; a GPU moves them to the host once prompts are encoded).
        images: training images (or a merge's views per concept) the VAE encodes before training: the first
            moment of training and merging is the float UNet beside the VAE's encoder activations.
    """
    kind = base.device.type
    device_gb = device_memory_gb(base.device) if device_gb is None else device_gb
    pipe = base.pipe
    on_host = kind == "cpu"  # one memory: originals and copies both count
    if encoders_on_device is None:
        encoders_on_device = on_host
    encoders = sum(_module_bytes(m) for m in _text_encoders(pipe))
    vae = _module_bytes(pipe.vae)
    # A stage's moments, (what, weights, adapter, activations): its peak is the largest. Prompts are encoded with
    # the text encoders on the device, then they leave it (on a GPU) before the VAE encodes the images. A QDoRA
    # base is quantized before either (after the class images, which the float base draws).
    float_unet = _module_bytes(pipe.unet)
    factor = _latent_factor(pipe.vae)
    kept = vae + (encoders if encoders_on_device else 0)
    if stage == "train":
        cfg = train or TrainConfig()
        unet = _module_bytes(pipe.unet, quantize=cfg.quantize_base)
        adapter = _adapter_params(pipe.unet, cfg) * ADAM_STATE_BYTES[cfg.optimizer]
        moments = [("encoding prompts", unet + vae + encoders, 0, 0.0),
                   ("encoding images", unet + kept, 0, _encode_activations(pipe.vae, cfg.resolution, images)),
                   ("training", unet + kept, adapter,
                    _activations(pipe.unet, "train", cfg.batch_size * (2 if cfg.prior_preservation else 1),
                                 cfg.resolution, cfg.resolution, cfg.gradient_checkpointing, cfg, factor))]
        if cfg.quantize_base != "none":  # the base as loaded, before its UNet is quantized
            moments.append(("quantizing the UNet", float_unet + vae + encoders, 0, 0.0))
        if cfg.prior_preservation:
            moments.append(("drawing class images", float_unet + vae + encoders, 0,
                            _activations(pipe.unet, "generate", 2, cfg.resolution, cfg.resolution, False, None,
                                         factor)))
        lower = "lower the resolution or the rank, train on a quantized base (QDoRA nf4) or turn on gradient " \
                "checkpointing"
    elif stage == "merge":
        cfg_m = merge or MergeConfig()
        size = base.default_size
        n = adapter_params if adapter_params is not None else _adapter_params(pipe.unet, train or TrainConfig())
        both = 2 * n * 4  # the two adapters in fp32, on the device from the start
        moments = [("encoding prompts", float_unet + vae + encoders, both, 0.0)]
        if cfg_m.learned:
            moments += [("encoding images", float_unet + kept, both, _encode_activations(pipe.vae, size, images)),
                        ("merging", float_unet + kept, 2 * both,  # + the merged parts
                         _activations(pipe.unet, "merge", cfg_m.batch_size, size, size,
                                      cfg_m.gradient_checkpointing, train or TrainConfig(), factor,
                                      graphs=3 if cfg_m.keep_subject else 2))]
        lower = "lower the merge batch or turn on gradient checkpointing"
    elif stage == "generate":
        cfg_g = generate or GenerateConfig()
        fused = 0
        if adapters and on_host:  # the fused copies beside the originals (a GPU keeps originals on the host)
            fused = _module_bytes(pipe.unet, only=_adapted_linears(pipe.unet, train or TrainConfig()))
        guided = 2 if cfg_g.guidance > 1 else 1
        moments = [("denoising", float_unet + vae + encoders, fused,
                    _activations(pipe.unet, "generate", guided * cfg_g.num_images, cfg_g.height, cfg_g.width, False,
                                 None, factor)),
                   ("decoding", float_unet + vae + encoders, 0, _decode_activations(pipe.vae, cfg_g))]  # unfused
        lower = "generate fewer images at once or a smaller size"
    else:
        raise ValueError(f"unknown stage {stage!r}")
    a = ACTIVATION_FACTOR[kind]
    slack = 1 + WEIGHT_SLACK[kind]
    moment, weights, adapter, activations = max(moments, key=lambda m: slack * (m[1] + m[2]) + a * m[3])
    overhead = OVERHEAD_GB[kind] + WEIGHT_SLACK[kind] * (weights + adapter) / GIB
    counted = tuple((name, w / GIB, ad / GIB, act / GIB) for name, w, ad, act in moments)
    return MemoryPlan(stage, weights / GIB, adapter / GIB, a * activations / GIB, overhead, device_gb, lower, moment,
                      counted)


def check_fits(plan: MemoryPlan) -> None:
    """Refuse a job that cannot fit on the device, naming what to change."""
    from .errors import ZipqError

    if not plan.fits:
        raise ZipqError(f"This {plan.stage} {plan.describe()}, more than this GPU has: {plan.lower}.")


def _text_encoders(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]


def _module_bytes(module: torch.nn.Module, quantize: str = "none", only: set[str] | None = None) -> int:
    """Parameter and buffer bytes of `module` as a stage holds it: a quantized UNet's Linear weights at their
    storage size; with `only`, just those submodules' weights."""
    per_weight = {"nf4": NF4_BYTES_PER_WEIGHT, "int8": INT8_BYTES_PER_WEIGHT}.get(quantize)
    total = 0.0
    for name, sub in module.named_modules():
        if only is not None:
            if name in only:
                total += sub.weight.numel() * sub.weight.element_size()
            continue
        for pname, p in sub.named_parameters(recurse=False):
            if per_weight is not None and isinstance(sub, torch.nn.Linear) and pname == "weight":
                total += p.numel() * per_weight + sub.out_features * 4
            else:
                total += p.numel() * p.element_size()
        total += sum(b.numel() * b.element_size() for b in sub.buffers(recurse=False))
    return int(total)


def _adapted_linears(unet: torch.nn.Module, cfg: TrainConfig) -> set[str]:
    """The module paths peft adapts for `cfg` (its suffix list, or its one regex when limited to blocks)."""
    import re

    from .train.loop import peft_targets

    targets = peft_targets(cfg)
    matches = (lambda n: re.fullmatch(targets, n) is not None) if isinstance(targets, str) else \
        (lambda n: n.rsplit(".", 1)[-1] in targets)
    return {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and matches(n)}


def _adapter_params(unet: torch.nn.Module, cfg: TrainConfig) -> int:
    """Trainable parameters of the adapter `cfg` attaches: r·(in + out) per layer, plus out for DoRA's m."""
    total = 0
    for name in _adapted_linears(unet, cfg):
        m = unet.get_submodule(name)
        w = m.weight
        fan_in = w[0].numel()
        total += cfg.rank * (fan_in + w.shape[0]) + (w.shape[0] if cfg.method == "dora" else 0)
    return total


class _LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor storage created while it is active and still alive, and remembers the
    most at once. The model's own tensors (`existing`: weights, buffers, adapter factors) are counted elsewhere:
    a view of one (a weight's transpose in every linear layer) is not new memory."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = {id(t.untyped_storage()) for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        """Count `t`'s storage until it is freed (once, however many views of it there are)."""
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self._seen:
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.nbytes(), key)

    def _free(self, nbytes: int, key: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)


class AllocationCounter:
    """The most bytes of tensors alive at once while active, the given models' own tensors counted from the start:
    what a device's allocator would be asked for (on the CPU, the analogue of `torch.cuda.max_memory_allocated`).
    Tensors on `meta` cost nothing. Used to check the plan against real runs."""

    def __init__(self, modules: Iterable[torch.nn.Module] = ()):
        class Counter(_LiveBytes):
            def track(self, t: torch.Tensor) -> None:
                if t.device.type != "meta":
                    super().track(t)

        self._mode = Counter()
        for module in modules:
            for t in (*module.parameters(), *module.buffers()):
                self._mode.track(t)

    def __enter__(self) -> AllocationCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    @property
    def peak_gb(self) -> float:
        return self._mode.peak / GIB


class _FusedAttention:
    """A diffusers attention processor for the meta replay: SD's attention as one fused kernel (flash-style, as
    `scaled_dot_product_attention` runs on the CPU and CUDA), so no [tokens × tokens] matrix is counted."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        shape = hidden_states.shape
        if hidden_states.ndim == 4:  # the VAE's mid-block attention: [B, C, H, W] → [B, HW, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        split = lambda x: x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(split(q), split(k), split(v), 0.0, False)[0]
        out = out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _meta_unet(unet: torch.nn.Module) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(unet.config)
    model = model.to(_float_dtype(unet)).requires_grad_(False)
    model.set_attn_processor(_FusedAttention())
    return model


def _float_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype != torch.float32),
                next(p.dtype for p in module.parameters()))


def _latent_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell along each side (8 for SD; the bundled mini's VAE: 4)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _unet_inputs(model, batch: int, height: int, width: int, dtype: torch.dtype, factor: int) -> tuple:
    meta = dict(device="meta", dtype=dtype)
    x = torch.zeros(batch, model.config.in_channels, height // factor, width // factor, **meta)
    text = torch.zeros(batch, 77, model.config.cross_attention_dim, **meta)
    added = None
    if model.config.addition_embed_type == "text_time":
        pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(batch, pooled, **meta), "time_ids": torch.zeros(batch, 6, **meta)}
    return x, torch.zeros(batch, device="meta"), text, added


def _activations(unet: torch.nn.Module, stage: str, batch: int, height: int, width: int, checkpointing: bool,
                 cfg: TrainConfig | None, factor: int = 8, graphs: int = 2) -> float:
    """Peak bytes of tensors alive during the stage's UNet passes, replayed on the meta device (cached). `graphs`:
    a merge step's merged passes held for one backward (the two concepts, and the combined prompt's)."""
    adapter = (cfg.rank, cfg.method, tuple(cfg.target_modules), tuple(cfg.block_prefixes)) if cfg else None
    key = (stage, _config_key(unet.config), str(_float_dtype(unet)), batch, height, width, checkpointing, adapter,
           factor, graphs)
    return _cached_peak(key, lambda: _unet_replay(unet, stage, batch, height, width, checkpointing, cfg, factor,
                                                  graphs))


def _cached_peak(key: tuple, replay: Callable[[], _LiveBytes]) -> float:
    """The peak of a replay, run once per key (the same settings plan the same)."""
    with _FLOPS_LOCK:
        if key in _ACTIVATIONS:
            return _ACTIVATIONS[key]
    peak = float(replay().peak)
    with _FLOPS_LOCK:
        _ACTIVATIONS[key] = peak
    return peak


def _unet_replay(unet: torch.nn.Module, stage: str, batch: int, height: int, width: int, checkpointing: bool,
                 cfg: TrainConfig | None, factor: int, graphs: int = 2) -> _LiveBytes:
    """The stage's UNet passes on a meta copy: a training step with the adapter attached, a merge step (`graphs`
    merged passes, then one backward), or one denoising forward."""
    model = _meta_unet(unet)
    dtype = _float_dtype(unet)
    x, t, text, added = _unet_inputs(model, batch, height, width, dtype, factor)
    if checkpointing:
        model.enable_gradient_checkpointing()
    if stage == "train":
        from .train.loop import lora_config

        model.add_adapter(lora_config(cfg))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        model.train()
        with _LiveBytes(_tensors(model)) as live:
            out = model(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
            out.float().square().mean().backward()
    elif stage == "merge":
        live = _merge_replay(model, cfg, x, t, text, added, graphs)
    else:
        with _LiveBytes(_tensors(model)) as live, torch.no_grad():
            model(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
    return live


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _merge_replay(model, cfg: TrainConfig, x, t, text, added, graphs: int = 2) -> _LiveBytes:
    """A learned-merge step: both adapters' parts on live layers, mergers trainable, `graphs` merged passes (two
    concepts, and the combined prompt's with keep_subject) then backward."""
    from types import SimpleNamespace

    from .adapters import LoraLayer
    from .adapters.live import live_layers

    keys = [f"unet.{n}" for n in sorted(_adapted_linears(model, cfg))]
    with live_layers(SimpleNamespace(unet=model), keys) as layers:
        for layer in layers.values():
            w = layer.base.weight
            meta = dict(device="meta", dtype=torch.float32)
            column = torch.ones(w.shape[1], **meta, requires_grad=True)
            ones = [1] * (w.dim() - 2)
            layer.parts = [LoraLayer(torch.zeros(cfg.rank, *w.shape[1:], **meta) * column.view(1, -1, *ones),
                                     torch.zeros(w.shape[0], cfg.rank, *ones, **meta), 1.0,
                                     torch.ones(w.shape[0], **meta) if cfg.method == "dora" else None)
                           for _ in range(2)]
        factors = [f for layer in layers.values() for part in layer.parts for f in (part.down, part.up,
                                                                                   part.magnitude) if f is not None]
        with _LiveBytes([*_tensors(model), *factors]) as live:
            with torch.no_grad():  # the teachers' targets
                targets = [model(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample for _ in range(2)]
            preds = [model(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample for _ in range(graphs)]
            # subject, style, then (keep_subject) the combined prompt, which is held to the subject's target
            sum((p.float() - q.float()).square().mean()
                for p, q in zip(preds, [targets[0], targets[1], targets[0]])).backward()
    return live


def _vae_meta(vae: torch.nn.Module):
    """The VAE on the meta device in the dtype a stage runs it (fp32 where the config asks for an fp16 VAE)."""
    from diffusers import AutoencoderKL

    dtype = _float_dtype(vae)
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        dtype = torch.float32
    with torch.device("meta"):
        model = AutoencoderKL.from_config(vae.config)
    model = model.to(dtype)
    model.set_attn_processor(_FusedAttention())
    return model, dtype


def _encode_activations(vae: torch.nn.Module, side: int, images: int) -> float:
    """Peak bytes of the VAE encode as `encode.encode_images` runs it (at most a megapixel per chunk)."""
    chunk = max(1, min(8, images, 2**20 // (side * side)))
    key = ("encode", _config_key(vae.config), str(_float_dtype(vae)), side, chunk)

    def replay() -> _LiveBytes:
        model, dtype = _vae_meta(vae)
        x = torch.zeros(chunk, model.config.in_channels, side, side, device="meta", dtype=dtype)
        with _LiveBytes(_tensors(model)) as live, torch.no_grad():
            model.encode(x)
        return live

    return _cached_peak(key, replay)


def _decode_activations(vae: torch.nn.Module, cfg: GenerateConfig) -> float:
    """Peak bytes of the VAE decode as generation runs it (one image at a time for several; tiled above the
    VAE's size; fp32 where the config asks for an fp16 VAE)."""
    side = int(vae.config.get("sample_size") or 512)
    tiled = cfg.width * cfg.height > side * side
    key = ("decode", _config_key(vae.config), str(_float_dtype(vae)), cfg.width, cfg.height, tiled)

    def replay() -> _LiveBytes:
        model, dtype = _vae_meta(vae)
        if tiled:
            model.enable_tiling()
        f = _latent_factor(vae)
        z = torch.zeros(1, model.config.latent_channels, cfg.height // f, cfg.width // f, device="meta", dtype=dtype)
        with _LiveBytes(_tensors(model)) as live, torch.no_grad():
            model.decode(z)
        return live

    return _cached_peak(key, replay)
