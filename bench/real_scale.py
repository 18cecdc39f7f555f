"""Full-size SDXL and SD1.5 without downloading anything: each stage measured at the scale users run it.

The pipelines are built from the published configs (stabilityai/stable-diffusion-xl-base-1.0,
stable-diffusion-v1-5) with random weights, directly in the compute dtype, and run through the product's own code
(`train_adapter`, `merge_adapters`, `generate`) with the family defaults a GPU user gets. Every row runs in its own
process, so its peak is its own:
- `measured_peak_gb`: what the process really held. CPU: the resident high-water mark (reset when the stage
  starts, `/proc/self/clear_refs`) minus the resident size after the imports; CUDA: the caching allocator's
  reserved peak (`torch.cuda.max_memory_reserved`).
- `allocated_peak_gb`: the most bytes of tensors alive at once, the models' weights included: what the allocator
  is asked for. CUDA: `torch.cuda.max_memory_allocated()`; CPU: the same count taken by a dispatch mode that sees
  every tensor the stage's operators create (`plan.AllocationCounter`). The planner counts exactly this; the
  difference to the measured peak is what no tensor shows (on the CPU the kernels' scratch buffers and the C
  allocator's fragmentation; on a GPU cuDNN's workspaces, the caching allocator's slack, CUDA's context), which
  the planner's two constants per device stand for.
On the CPU, host and device are one memory, so the product's "text encoders to the host once the prompts are
encoded" (`BaseModel.text_encoders_on_device(False)`) does nothing. Here it moves them to `meta` instead, as a GPU
run takes them off the device: the peak is the larger of the peak before that moment (encoders present) and the
peak after it, and their size is reported as `encoders_off_device_gb`.
Seconds per step are the time between the first and the second step (the first carries the setup).

The planner's estimate (`zipq_core.plan.plan_memory`) stands beside each measurement. Its three constants per device
(activation factor, weight slack, overhead) are fitted by `--fit` on the `fit` rows (other resolutions than the scored
ones, smallest worst relative error): the scored rows never choose them.

Usage: python bench/real_scale.py --out FILE [--family sdxl|sd15] [--stage train|merge|generate]
       [--mode bf16|nf4] [--role score|fit]      (rows already in FILE are kept: the run resumes)
       python bench/real_scale.py --out FILE --fit   (the planner's constants from FILE's fit rows)
       python bench/real_scale.py --out FILE --markdown TABLE.md   (the scored rows as a table, against TARGETS)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT  # first: it puts the checkout on the import path

# The published configs (unet/config.json, vae/config.json, text_encoder*/config.json of the two hub repos).
UNET = {
    "sdxl": dict(act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256,
                 attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), in_channels=4,
                 out_channels=4, layers_per_block=2, norm_num_groups=32, projection_class_embeddings_input_dim=2816,
                 sample_size=128, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 flip_sin_to_cos=True, freq_shift=0),
    "sd15": dict(act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                 cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, in_channels=4, out_channels=4,
                 layers_per_block=2, norm_num_groups=32, sample_size=64, flip_sin_to_cos=True, freq_shift=0),
}
VAE = dict(act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3, latent_channels=4,
           layers_per_block=2, norm_num_groups=32)
VAE_FAMILY = {"sdxl": dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
              "sd15": dict(sample_size=512, scaling_factor=0.18215, force_upcast=False)}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
RESOLUTION = {"sdxl": 1024, "sd15": 512}
FAMILY = {"sdxl": "sdxl", "sd15": "sd1"}  # the core's family names
STAGES = (("train", "bf16"), ("train", "nf4"), ("merge", "bf16"), ("generate", "bf16"))
SCORED = [(f, s, m, RESOLUTION[f], "score") for f in ("sd15", "sdxl") for s, m in STAGES]
FIT = [("sd15", "train", "bf16", 256, "fit"), ("sd15", "train", "bf16", 384, "fit"),
       ("sd15", "generate", "bf16", 256, "fit"), ("sdxl", "train", "bf16", 512, "fit"),
       ("sdxl", "generate", "bf16", 512, "fit"), ("sdxl", "train", "bf16", 768, "fit"),
       ("sdxl", "generate", "bf16", 768, "fit")]
ROWS = FIT + SCORED
GB = 1024**3


def build_pipeline(family: str, dtype, device: str = "cpu"):
    """The family's pipeline from its configs, random weights, built directly in `dtype` (no fp32 detour); on
    `meta`, only the shapes (for planning)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = lambda pad: CLIPTokenizer(str(ROOT / "assets/tokenizer/vocab.json"),
                                          str(ROOT / "assets/tokenizer/merges.txt"), pad_token=pad,
                                          model_max_length=77)
    text = lambda cfg: CLIPTextConfig(**cfg, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    scheduler = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            models = dict(unet=UNet2DConditionModel(**UNET[family]), vae=AutoencoderKL(**VAE, **VAE_FAMILY[family]),
                          text_encoder=CLIPTextModel(text(CLIP_L)))
            if family == "sdxl":
                models["text_encoder_2"] = CLIPTextModelWithProjection(text(CLIP_BIG_G))
    finally:
        torch.set_default_dtype(previous)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            **models, tokenizer=tokenizer("<|endoftext|>"), tokenizer_2=tokenizer("!"),
            scheduler=EulerDiscreteScheduler(**scheduler, timestep_spacing="leading", steps_offset=1))
    return StableDiffusionPipeline(
        **models, tokenizer=tokenizer("<|endoftext|>"),
        scheduler=DDIMScheduler(**scheduler, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class Peak:
    """Peak memory since `reset()`, above what the process held after its imports."""

    def __init__(self, device):
        self.device = device
        self.after_imports = _rss_bytes("VmRSS")

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def read_gb(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved() / GB
        return (_rss_bytes("VmHWM") - self.after_imports) / GB

    def allocated_gb(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / GB


def place_encoders_as_a_gpu_does(base, peak: Peak) -> dict:
    """On the CPU, make `text_encoders_on_device(False)` free the encoders (see the module's docstring).
    Returns a dict that gets `before_gb` (the peak up to that moment) and `encoders_gb`."""
    from zipq_core.base import free_device_memory
    from zipq_core.plan import _module_bytes, _text_encoders

    if base.device.type != "cpu":
        return {}
    moved: dict = {}

    def place(on: bool) -> None:
        if on and moved:
            raise RuntimeError("a stage asked for the text encoders after taking them off the device")
        if not on and not moved:
            moved["before_gb"] = peak.read_gb()
            moved["encoders_gb"] = sum(_module_bytes(m) for m in _text_encoders(base.pipe)) / GB
            for encoder in _text_encoders(base.pipe):
                encoder.to("meta")
            free_device_memory()  # what the product does after moving them on a GPU
            peak.reset()

    base.text_encoders_on_device = place
    return moved


def _images(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _random_adapter(base, cfg, seed: int):
    """A DoRA adapter on the family's default targets at its default rank, with trained-looking values."""
    import torch

    from zipq_core.adapters import Adapter, LoraLayer, row_norm
    from zipq_core.train.loop import peft_targets

    targets = peft_targets(cfg)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in base.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out, inp = module.weight.shape
            down = torch.randn(cfg.rank, inp, generator=g) / inp**0.5
            up = torch.randn(out, cfg.rank, generator=g) * 1e-3
            magnitude = row_norm(module.weight.float()) * (1 + 0.01 * torch.rand(out, generator=g))
            layers[f"unet.{name}"] = LoraLayer(down, up, cfg.lora_alpha / cfg.rank, magnitude)
    return Adapter(layers, use_dora=True, info={"kind": "subject", "token": "sks"})


def settings(family: str, stage: str, mode: str, resolution: int):
    """The row's configs: the family defaults a GPU user gets, two steps."""
    from zipq_core import TrainConfig
    from zipq_core.config import GenerateConfig, MergeConfig

    train = TrainConfig.for_family(FAMILY[family], class_noun="thing", steps=2, resolution=resolution,
                                   quantize_base="none" if mode in ("bf16", "fp16") else mode)
    merge = MergeConfig.for_family(FAMILY[family], method="zipq", steps=2)
    generate = GenerateConfig(prompt="a photo of sks thing", steps=2, width=resolution, height=resolution)
    return train, merge, generate


def plan_row(base, stage: str, mode: str, resolution: int):
    """The planner's estimate for a row on `base` (a measured one, or the same pipeline on `meta`)."""
    from zipq_core.plan import plan_memory

    train, merge, generate = settings(base.spec.split("-")[0], stage, mode, resolution)
    return plan_memory(base, stage, train=train, merge=merge, generate=generate,
                       encoders_on_device=stage == "generate", images=2)


def meta_base(family: str, kind: str):
    """The family's pipeline with `meta` weights (nothing allocated), for planning rows without running them."""
    import torch

    from zipq_core.base import BaseModel

    dtype = torch.bfloat16 if kind == "cpu" else torch.float16
    pipe = build_pipeline(family, dtype, "meta")
    return BaseModel(spec=f"{family}-random", pipe=pipe, arch=FAMILY[family], device=torch.device(kind),
                     dtype=dtype, lock=None)


def measure(family: str, stage: str, mode: str, resolution: int) -> dict:
    """One row, in this process."""
    import torch

    from zipq_core import load_adapter
    from zipq_core.adapters import save_adapter, save_training_views
    from zipq_core.base import BaseModel, pick_device
    from zipq_core.data import DataConfig, prepare_images
    from zipq_core.generation import generate
    from zipq_core.merge import merge_adapters
    from zipq_core.plan import AllocationCounter, _text_encoders
    from zipq_core.train import train_adapter

    device = pick_device()
    peak = Peak(device)
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    base = BaseModel.from_pipeline(f"{family}-random", build_pipeline(family, dtype), device, dtype)
    base.reload_unet = lambda: None  # QDoRA would reload from disk after the run: the row ends before
    train_cfg, merge_cfg, gen_cfg = settings(family, stage, mode, resolution)
    plan = plan_row(base, stage, mode, resolution)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if stage == "merge":  # two DoRAs of the family's defaults, with their training views
            for i, kind in enumerate(("subject", "style")):
                save_adapter(_random_adapter(base, train_cfg, i), tmp / kind)
                views = prepare_images(_images(tmp / f"img{i}", 2, resolution), "a photo",
                                       DataConfig(resolution=resolution))
                save_training_views([v.image for v in views.images], [v.caption for v in views.images], tmp / kind)
        elif stage == "generate":
            save_adapter(_random_adapter(base, train_cfg, 0), tmp / "adapter")
            adapter = load_adapter(tmp / "adapter")
        elif stage == "train":
            images = prepare_images(_images(tmp / "img", 2, resolution), train_cfg.instance_prompt,
                                    DataConfig(resolution=resolution), token=train_cfg.token)
        peak.reset()
        moved = place_encoders_as_a_gpu_does(base, peak)
        models = [base.unet, base.pipe.vae, *_text_encoders(base.pipe)]
        allocated = AllocationCounter(models if device.type == "cpu" else [])
        allocated.__enter__()
        started = time.perf_counter()
        stamp = lambda *_: times.append(time.perf_counter() - started)
        if stage == "train":
            for record in train_adapter(base, images, train_cfg, tmp / "out"):
                if record.step >= 1:
                    times.append(record.elapsed)  # seconds since the loop started, taken before any saving
                if record.step >= 2:
                    break
        elif stage == "merge":
            for record in merge_adapters(base, tmp / "subject", tmp / "style", merge_cfg, tmp / "merged"):
                if record.step >= 1 and not record.done:
                    times.append(record.elapsed)  # seconds since the loop started, taken before any saving
                if record.step >= 2:
                    break
        else:
            generate(base, gen_cfg, [(adapter, 1.0)], on_step=stamp)
        allocated.__exit__(None, None, None)
        held = max(peak.read_gb(), moved.get("before_gb", 0.0))
        used = allocated.peak_gb if device.type == "cpu" else peak.allocated_gb()
    step = round(times[1] - times[0], 2) if len(times) > 1 else None
    return {"family": family, "stage": stage, "mode": mode, "resolution": resolution,
            "measured_peak_gb": round(held, 3), "allocated_peak_gb": round(used, 3),
            "planned_peak_gb": round(plan.peak_gb, 3), "s_per_step": step,
            "encoders_off_device_gb": round(moved.get("encoders_gb", 0.0), 3),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"}


def plan_of(row: dict):
    """The planner's `MemoryPlan` for a row, with its constants as they are now: replayed on `meta` weights, so rows
    measured earlier are re-planned without rerunning them."""
    kind = "cpu" if row["device"].startswith("cpu") else "cuda"
    key = (row["family"], kind)
    if key not in _META:
        _META[key] = meta_base(row["family"], kind)
    return plan_row(_META[key], row["stage"], row["mode"], row["resolution"])


def counts(row: dict) -> tuple[float, float, float]:
    """(weights + adapter, activations before the constants, planned peak) at the row's peak moment."""
    from zipq_core import plan

    needs = plan_of(row)
    kind = "cpu" if row["device"].startswith("cpu") else "cuda"
    return needs.weights_gb + needs.adapter_gb, needs.activations_gb / plan.ACTIVATION_FACTOR[kind], needs.peak_gb


_META: dict = {}


def fit(rows: list[dict]) -> dict:
    """The planner's constants on the fit rows: the (activation factor, weight slack, overhead ≥ 0) whose planned
    peaks — each the largest of the row's moments, (1 + slack)·(weights + adapter) + factor·activations + overhead —
    have the smallest worst relative error against the measured peaks (a grid search: the peak moment itself moves
    with the constants, so a least-squares fit on one moment per row does not minimise what is scored)."""
    import numpy as np

    used = [r for r in rows if r.get("role") == "fit"]
    if len(used) < 3:
        raise SystemExit("--fit needs at least three fit rows in the file: run with --role fit first")
    moments = [plan_of(r).moments for r in used]
    width = max(len(m) for m in moments)
    fixed = np.full((len(used), width), -np.inf)  # a missing moment never wins the max
    acts = np.zeros((len(used), width))
    for i, row_moments in enumerate(moments):
        for j, (_, weights, adapter, activations) in enumerate(row_moments):
            fixed[i, j], acts[i, j] = weights + adapter, activations
    measured = np.array([r["measured_peak_gb"] for r in used])
    factors, slacks, overheads = np.arange(1.0, 3.0, 0.01), np.arange(0.0, 0.4, 0.01), np.arange(0.0, 0.5, 0.02)
    a, s, b = (x.reshape(-1, 1, 1) for x in np.meshgrid(factors, slacks, overheads, indexing="ij"))
    planned = ((1 + s) * fixed + a * acts).max(axis=2) + b.reshape(-1, 1)  # (grid, rows)
    errors = np.abs(planned / measured - 1)
    best = int(np.lexsort((errors.mean(axis=1), errors.max(axis=1)))[0])
    return {"ACTIVATION_FACTOR": round(float(a.flat[best]), 3), "WEIGHT_SLACK": round(float(s.flat[best]), 3),
            "OVERHEAD_GB": round(float(b.flat[best]), 3), "worst_fit_error": round(float(errors[best].max()), 3),
            "rows": len(used)}


def report(rows: list[dict]) -> list[dict]:
    """Every row's plan under the planner as it is now, and its error against the measurement."""
    for r in rows:
        fixed, activations, r["planned_peak_gb"] = (round(x, 3) for x in counts(r))
        r["plan_error"] = round(r["planned_peak_gb"] / r["measured_peak_gb"] - 1, 3)
        # the plan's count before its constants, against the tensors the run allocated
        r["count_error"] = round((fixed + activations) / r["allocated_peak_gb"] - 1, 3)
    return rows


# Peak memory targets (GB) of the scored rows: issue "Real scale" (a 12 GB card for SDXL training, 8 GB with nf4).
TARGETS = {("sdxl", "train", "bf16"): 12, ("sdxl", "train", "nf4"): 8, ("sdxl", "merge", "bf16"): 16,
           ("sdxl", "generate", "bf16"): 11, **{("sd15", s, m): 6 for s, m in STAGES}}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | stage | base | px | measured peak GB | target | planned GB (error) | tensors GB | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("role") != "score":
            continue
        target = TARGETS.get((r["family"], r["stage"], r["mode"]))
        met = "" if target is None else (" ✓" if r["measured_peak_gb"] <= target else " ✗")
        lines.append(f"| {'SDXL' if r['family'] == 'sdxl' else 'SD1.5'} | {r['stage']} | {r['mode']} | "
                     f"{r['resolution']} | {r['measured_peak_gb']:.2f} | ≤ {target}{met} | {r['planned_peak_gb']:.2f} "
                     f"({r['plan_error']:+.0%}) | {r['allocated_peak_gb']:.2f} | {r['s_per_step']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sdxl", "sd15"))
    parser.add_argument("--stage", choices=("train", "merge", "generate"))
    parser.add_argument("--mode", choices=("bf16", "nf4", "int8"))
    parser.add_argument("--role", choices=("score", "fit"))
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fit", action="store_true", help="print the planner's constants fitted on FILE's fit rows")
    parser.add_argument("--markdown", type=Path, help="write the scored rows of FILE as a Markdown table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.family, args.stage, args.mode, args.resolution)))
        return
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    if args.fit:
        print(json.dumps(fit(rows)))
        return
    if args.markdown:
        args.markdown.write_text(markdown(report(rows)))
        args.out.write_text(json.dumps(rows, indent=2))
        return
    done = {(r["family"], r["stage"], r["mode"], r["resolution"]) for r in rows}
    for family, stage, mode, resolution, role in ROWS:
        if (args.family and family != args.family) or (args.stage and stage != args.stage) or \
                (args.mode and mode != args.mode) or (args.role and role != args.role):
            continue
        if (family, stage, mode, resolution) in done:
            continue
        command = [sys.executable, __file__, "--worker", "--family", family, "--stage", stage, "--mode", mode,
                   "--resolution", str(resolution), "--out", str(args.out)]
        print(f"{family} {stage} {mode} {resolution}px …", file=sys.stderr, flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            continue
        rows.append({**json.loads(result.stdout.strip().splitlines()[-1]), "role": role})
        args.out.write_text(json.dumps(report(rows), indent=2))  # after every row: an interrupted run resumes here
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(report(rows), indent=2))


if __name__ == "__main__":
    main()
