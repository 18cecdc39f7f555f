"""The memory plan (zipq_core.plan): what it counts before a job equals what the job allocates when it runs, and a job
that cannot fit is refused before it starts, with what to lower."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from zipq_core import TrainConfig, ZipqError, load_adapter, load_base, plan, train_adapter
from zipq_core.config import TRAIN_SAMPLE_STEPS, DataConfig, GenerateConfig, MergeConfig
from zipq_core.data import prepare_images
from zipq_core.generation import generate
from zipq_core.merge import merge_adapters


def assert_close(needs: plan.MemoryPlan, peak_gb: float) -> None:
    """The plan's count may be 5 % under what the run allocated (kernels' scratch is the constants' job) and 10 %
    over (safe: a refused job that would have fit is the lesser harm)."""
    assert 0.95 * peak_gb <= counted(needs) <= 1.10 * peak_gb, (peak_gb, needs.as_dict())


def counted(needs: plan.MemoryPlan) -> float:
    """The plan's own count (the `counting` fixture sets the device constants to none)."""
    return needs.peak_gb


@pytest.fixture
def counting(monkeypatch):
    """The planner without its per-device constants (fitted for what no tensor shows): its count alone."""
    monkeypatch.setitem(plan.ACTIVATION_FACTOR, "cpu", 1.0)
    monkeypatch.setitem(plan.WEIGHT_SLACK, "cpu", 0.0)
    monkeypatch.setitem(plan.OVERHEAD_GB, "cpu", 0.0)


def models(base) -> list:
    return [base.unet, base.pipe.vae, *plan._text_encoders(base.pipe)]


def train_two_steps(base, folder, cfg, out) -> None:
    images = prepare_images(folder, cfg.instance_prompt, DataConfig(resolution=cfg.resolution), token=cfg.token)
    for record in train_adapter(base, images, cfg, out):
        if record.step >= 2:
            break


@pytest.mark.parametrize("spec, resolution, checkpointing, batch", [
    ("mini", 64, False, 1), ("mini", 64, True, 2), ("mini", 128, False, 2), ("tiny_sdxl", 64, True, 1)])
def test_the_training_plan_is_what_training_allocates(spec, resolution, checkpointing, batch, subject_dir, tmp_path,
                                                      request,
                                                      counting):
    base = load_base("mini" if spec == "mini" else str(request.getfixturevalue("tiny_sdxl_dir")))
    cfg = TrainConfig.for_family(base.family, class_noun="thing", steps=2, resolution=resolution, batch_size=batch,
                                 gradient_checkpointing=checkpointing)
    images = len(prepare_images(subject_dir, "x", DataConfig(resolution=resolution)).images)
    needs = plan.plan_memory(base, "train", train=cfg, images=images)
    with plan.AllocationCounter(models(base)) as run:
        train_two_steps(base, subject_dir, cfg, tmp_path / "out")
    assert_close(needs, run.peak_gb)


@pytest.mark.parametrize("size, images", [(64, 1), (128, 2)])
def test_the_generation_plan_is_what_generation_allocates(mini, size, images, counting):
    cfg = GenerateConfig(prompt="a photo", steps=3, width=size, height=size, num_images=images)
    needs = plan.plan_memory(mini, "generate", generate=cfg, adapters=0)
    with plan.AllocationCounter(models(mini)) as run:
        generate(mini, cfg, [])
    assert_close(needs, run.peak_gb)


@pytest.mark.parametrize("keep_subject", [0.0, 1.0])  # 1: a third merged pass held for the backward
def test_the_merge_plan_is_what_a_learned_merge_allocates(mini, subject_dir, style_dir, tmp_path, counting,
                                                          keep_subject):
    for kind, folder in (("subject", subject_dir), ("style", style_dir)):
        cfg = TrainConfig.for_family("mini", kind=kind, token="sks" if kind == "subject" else "zkz",
                                     class_noun="thing", steps=2)
        train_two_steps(mini, folder, cfg, tmp_path / kind)
    cfg = MergeConfig.for_family("mini", method="zipq", steps=2, keep_subject=keep_subject)
    params = max(load_adapter(tmp_path / k).num_params() for k in ("subject", "style"))
    views = max(len(prepare_images(f, "x", DataConfig()).images) for f in (subject_dir, style_dir))
    needs = plan.plan_memory(mini, "merge", merge=cfg, adapter_params=params, images=views)
    with plan.AllocationCounter(models(mini)) as run:
        for _ in merge_adapters(mini, tmp_path / "subject", tmp_path / "style", cfg, tmp_path / "merged"):
            pass
    assert_close(needs, run.peak_gb)


def test_a_job_that_cannot_fit_is_refused_naming_what_to_lower(mini):
    needs = plan.plan_memory(mini, "train", train=TrainConfig.for_family("mini", class_noun="thing"), device_gb=0.02)
    assert not needs.fits
    with pytest.raises(ZipqError, match=r"needs about .* GB of 0.02 GB while .*more than this GPU has: lower the "
                                        r"resolution or the rank"):
        plan.check_fits(needs)
    roomy = plan.plan_memory(mini, "train", train=TrainConfig.for_family("mini", class_noun="thing"), device_gb=80)
    assert roomy.fits
    plan.check_fits(roomy)


def test_the_training_estimate_counts_its_previews_and_class_images(mini):
    """A preview (every `sample_every` steps) and a class image each cost a guided generation and a decode: a
    300-step style with 100 previews spends most of its time on them, and the budget must know it."""
    speed = plan.Speed(1e9)
    cfg = TrainConfig.for_family("mini", class_noun="thing", steps=300, sample_every=0)
    image = speed.seconds(2 * TRAIN_SAMPLE_STEPS * plan.unet_flops(mini, 64, 64) + plan.decode_flops(mini, 64, 64))
    quiet = plan.train_seconds(mini, cfg, speed)
    assert plan.train_seconds(mini, replace(cfg, sample_every=3), speed) == pytest.approx(quiet + 100 * image)
    assert plan.train_seconds(mini, replace(cfg, sample_every=301), speed) == pytest.approx(quiet)  # never reached
    prior = replace(cfg, prior_preservation=True, num_class_images=12)
    step = speed.seconds(cfg.batch_size * plan.TRAIN_PASSES * plan.unet_flops(mini, 64, 64))
    assert plan.train_seconds(mini, prior, speed) == pytest.approx(quiet + 300 * step + 12 * image)


def fake_forwards(monkeypatch, seconds) -> dict:
    """UNet forwards that take `seconds(call)` on a fake clock (call 1 is the warm-up); counts the calls."""
    from zipq_core import encode

    clock = {"now": 0.0, "calls": 0}

    def forward(*args, **kwargs):
        clock["calls"] += 1
        clock["now"] += seconds(clock["calls"])

    monkeypatch.setattr(encode, "unet_forward", forward)
    monkeypatch.setattr(plan.time, "perf_counter", lambda: clock["now"])
    return clock


def test_the_speed_is_the_fastest_forward_so_a_busy_moment_does_not_refuse_jobs(mini, monkeypatch):
    """Two of the timed forwards are slowed, as by another process on the same cores: the measured speed is the
    undisturbed one, not one that would make every estimate several times too long."""
    clock = fake_forwards(monkeypatch, lambda call: 0.6 if call in (2, 3) else 0.15)
    speed = plan.measure_speed(mini)
    assert speed.flops_per_second == pytest.approx(plan.unet_flops(mini, 64, 64) / 0.15)
    assert clock["calls"] == 1 + 5


def test_slow_forwards_are_timed_twice_not_five_times(mini, monkeypatch):
    """A full-size UNet on a CPU: 30 s a forward; the measurement stops at two timed forwards, not five."""
    clock = fake_forwards(monkeypatch, lambda call: 30.0 if call == 2 else 20.0)
    speed = plan.measure_speed(mini)
    assert clock["calls"] == 1 + 2
    assert speed.flops_per_second == pytest.approx(plan.unet_flops(mini, 64, 64) / 20.0)


def test_checkpointing_and_quantizing_lower_the_plan_on_a_full_size_unet():
    """On SD1.5's published UNet config (meta weights: nothing is allocated), the knobs move the plan the right way."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from zipq_core.base import BaseModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                                    cross_attention_dim=768,
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
    pipe = SimpleNamespace(unet=unet.to(torch.bfloat16), vae=vae.to(torch.bfloat16), vae_scale_factor=8)
    base = BaseModel(spec="sd15-meta", pipe=pipe, arch="sd1", device=torch.device("cuda"), dtype=torch.bfloat16,
                     lock=None)
    plans = {}
    for name, extra in {"plain": dict(gradient_checkpointing=False), "checkpointed": {},
                        "nf4": dict(quantize_base="nf4")}.items():
        cfg = TrainConfig.for_family("sd1", class_noun="thing", resolution=512, **extra)
        plans[name] = plan.plan_memory(base, "train", train=cfg, device_gb=12, images=1)
    assert plans["checkpointed"].activations_gb < plans["plain"].activations_gb / 2
    assert plans["nf4"].peak_gb < plans["checkpointed"].peak_gb - 0.3  # its linear layers in 4 bits throughout


def test_cli_plan_prints_the_plan_and_trains_nothing(subject_dir, tmp_path, capsys):
    from zipq_core.cli import main

    assert main(["train", "--images", str(subject_dir), "--class-noun", "thing", "--out", str(tmp_path / "a"),
                 "--plan"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["plan"]["stage"] == "train" and shown["plan"]["peak_gb"] > 0
    assert shown["summary"].startswith("needs about")
    assert not (tmp_path / "a").exists()
