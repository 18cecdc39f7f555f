"""Training: determinism, resume == uninterrupted, cancel keeps the work, train → save → load == trained model."""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from zipq_core import GenerateConfig, TrainConfig, ZipqError, generate, load_adapter, load_base, train_adapter
from zipq_core.config import family_defaults, family_table, parse_targets
from zipq_core.data import DataConfig, prepare_images
from zipq_core.train import sample_timesteps


def _images(folder, cfg: TrainConfig):
    return prepare_images(folder, cfg.instance_prompt, DataConfig(resolution=cfg.resolution), token=cfg.token)


def _run(base, folder, cfg, out, **kw):
    records = list(train_adapter(base, _images(folder, cfg), cfg, out, **kw))
    return records


def _same_adapters(a, b) -> bool:
    return all(torch.equal(a.layers[k].down, b.layers[k].down) and torch.equal(a.layers[k].up, b.layers[k].up)
               and (a.layers[k].magnitude is None or torch.equal(a.layers[k].magnitude, b.layers[k].magnitude))
               for k in a.layers)


def test_training_is_deterministic_and_changes_the_model(mini, subject_dir, tmp_path):
    cfg = TrainConfig(class_noun="thing", steps=4, resolution=64)
    a_records = _run(mini, subject_dir, cfg, tmp_path / "a")
    _run(mini, subject_dir, cfg, tmp_path / "b")
    a, b = load_adapter(tmp_path / "a"), load_adapter(tmp_path / "b")
    assert a_records[-1].done and a_records[-1].step == 4
    assert _same_adapters(a, b)
    assert any(layer.up.abs().max() > 0 for layer in a.layers.values())
    assert a.info["kind"] == "subject" and len(a.info["loss_curve"]) == 4 and a.info["base"] == "mini"


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_equals_uninterrupted(mini, subject_dir, tmp_path, schedule):
    cfg = TrainConfig(class_noun="thing", steps=6, checkpoint_every=3, method="dora", lr_schedule=schedule)
    _run(mini, subject_dir, cfg, tmp_path / "full")
    # Stop after step 3 as a crash would (the generator is simply dropped), then resume.
    for record in train_adapter(mini, _images(subject_dir, cfg), cfg, tmp_path / "part"):
        if record.step == 3:
            assert record.checkpoint is not None
            break
    records = _run(mini, subject_dir, cfg, tmp_path / "part", resume=True)
    assert records[1].step == 4  # picked up after the checkpoint
    full, resumed = load_adapter(tmp_path / "full"), load_adapter(tmp_path / "part")
    assert _same_adapters(full, resumed)
    assert full.info["loss_curve"] == resumed.info["loss_curve"]


def test_cosine_schedule_decays_to_near_zero_after_the_warm_up(mini, subject_dir, tmp_path):
    """The optimizer's rate per step: the warm-up's ramp, then a cosine from the full rate, halved halfway through
    what is left, down to a small last step (not 0: the last step still trains)."""
    cfg = TrainConfig(class_noun="thing", steps=10, warmup_steps=2, learning_rate=1e-3, lr_schedule="cosine")
    rates = [r.lr for r in _run(mini, subject_dir, cfg, tmp_path / "c")[1:]]  # after the set-up record
    expected = [1e-3 * min(1, (k + 1) / 2) * 0.5 * (1 + math.cos(math.pi * max(0, k - 2) / 8)) for k in range(10)]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert rates[1] == pytest.approx(1e-3) and rates[6] == pytest.approx(5e-4) and 0 < rates[-1] < 1e-4
    flat = [r.lr for r in _run(mini, subject_dir, replace(cfg, lr_schedule="constant"), tmp_path / "f")[1:]]
    assert flat[2:] == pytest.approx([1e-3] * 8)


def test_cancel_saves_checkpoint_and_adapter(mini, subject_dir, tmp_path):
    cfg = TrainConfig(class_noun="thing", steps=50)
    cancel = threading.Event()
    last = None
    for last in train_adapter(mini, _images(subject_dir, cfg), cfg, tmp_path / "c", cancel=cancel):
        if last.step == 2:
            cancel.set()
    assert last.cancelled and last.step == 2 and last.checkpoint is not None
    assert load_adapter(tmp_path / "c").info["steps_done"] == 2
    # The shared base UNet is restored: no peft layers remain.
    from peft.tuners.tuners_utils import BaseTunerLayer
    assert not any(isinstance(m, BaseTunerLayer) for m in mini.unet.modules())


@pytest.mark.parametrize("arch_dir", ["tiny_sd1_dir", "tiny_sdxl_dir"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_trained_adapter_strength_ends(arch_dir, method, subject_dir, tmp_path, request):
    """train → save → load; strength 0 == base pixel for pixel; strength 1 == the model as trained (peft)."""
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(arch_dir)
    base = load_base(str(folder))
    cfg = TrainConfig(class_noun="thing", steps=3, method=method, learning_rate=5e-2)
    _run(base, subject_dir, cfg, tmp_path / "a")
    adapter = load_adapter(tmp_path / "a")
    gcfg = GenerateConfig(prompt=cfg.instance_prompt, steps=3, width=64, height=64)
    plain = np.asarray(generate(base, gcfg)[0])
    zero = np.asarray(generate(base, gcfg, [(adapter, 0.0)])[0])
    ours = np.asarray(generate(base, gcfg, [(adapter, 1.0)])[0], dtype=np.int16)
    assert np.array_equal(plain, zero)
    assert np.abs(ours - plain).max() > 0
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "a"))
    theirs = pipe(prompt=gcfg.prompt, num_inference_steps=3, width=64, height=64, guidance_scale=gcfg.guidance,
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 2  # uint8 rounding of tiny float noise


def test_bad_target_modules_are_named(mini, subject_dir, tmp_path):
    cfg = TrainConfig(class_noun="thing", steps=1, target_modules=("no_such_layer",))
    with pytest.raises(ZipqError, match="no_such_layer"):
        _run(mini, subject_dir, cfg, tmp_path / "x")


def test_resume_without_checkpoint_is_a_clear_error(mini, subject_dir, tmp_path):
    with pytest.raises(ZipqError, match="Nothing to resume"):
        _run(mini, subject_dir, TrainConfig(class_noun="thing", steps=2), tmp_path / "none", resume=True)


def test_prior_preservation_generates_and_uses_class_images(mini, subject_dir, tmp_path):
    cfg = TrainConfig(class_noun="thing", steps=2, prior_preservation=True, num_class_images=2)
    records = _run(mini, subject_dir, cfg, tmp_path / "p")
    assert records[-1].done
    assert len(list((tmp_path / "p" / "class_images").glob("*.png"))) == 2


@pytest.mark.parametrize("bad", [dict(rank=0), dict(steps=0), dict(token="two words"), dict(resolution=65),
                                 dict(method="loha"), dict(prior_preservation=True, class_noun=""),
                                 dict(timestep_bias="early"), dict(target_blocks="middle"),
                                 dict(lr_schedule="linear"), dict(lr_schedule="cosine", warmup_steps=4, steps=4)])
def test_config_errors_say_what_to_change(bad):
    with pytest.raises(ZipqError):
        TrainConfig(**bad)


def test_a_family_trains_each_kind_its_own_steps():
    mini, sd1 = family_defaults("mini"), family_defaults("sd1")
    assert TrainConfig.for_family("mini").steps == TrainConfig.for_family("mini", kind="subject").steps == mini.steps
    assert TrainConfig.for_family("mini", kind="style").steps == mini.steps_for("style") < mini.steps
    assert TrainConfig.for_family("mini", kind="style", steps=7).steps == 7  # a value given wins
    assert TrainConfig.for_family("sd1", kind="style").steps == sd1.steps  # a family without style steps of its own
    assert f"{mini.steps} (style {mini.steps_for('style')})" in family_table()


def test_timestep_bias_skews_the_draws_toward_its_noise_levels():
    """low_noise: 1/√2 of the draws in the lower half (t = u²·T); high_noise the mirror image; all within [0, T)."""
    draws = {bias: sample_timesteps(1000, 20_000, bias, torch.Generator().manual_seed(0))
             for bias in ("uniform", "low_noise", "high_noise")}
    lower_half = {bias: float((t < 500).float().mean()) for bias, t in draws.items()}
    assert abs(lower_half["uniform"] - 0.5) < 0.02
    skew = 2 ** -0.5
    assert abs(lower_half["low_noise"] - skew) < 0.01 and abs(lower_half["high_noise"] - (1 - skew)) < 0.01
    assert all(int(t.min()) >= 0 and int(t.max()) <= 999 for t in draws.values())
    again = sample_timesteps(1000, 20_000, "low_noise", torch.Generator().manual_seed(0))
    assert torch.equal(again, draws["low_noise"])


def test_auto_timestep_bias_and_blocks_follow_the_kind():
    assert TrainConfig(kind="subject").noise_bias == "high_noise"
    assert TrainConfig(kind="style").noise_bias == "uniform"
    assert TrainConfig(kind="style", timestep_bias="low_noise").noise_bias == "low_noise"
    assert TrainConfig(kind="subject").block_prefixes == () and TrainConfig(kind="style").block_prefixes
    assert TrainConfig(kind="style", target_blocks="all").block_prefixes == ()


def test_style_adapter_stays_in_the_decoder_half(mini, style_dir, tmp_path):
    """'auto' blocks: a style adapter only adapts up_blocks (it cannot redraw the layout); --target-blocks all
    reaches the encoder half and the mid block too."""
    for blocks, out in (("auto", tmp_path / "a"), ("all", tmp_path / "b")):
        _run(mini, style_dir, TrainConfig(kind="style", token="zkz", steps=2, target_blocks=blocks), out)
    auto, everywhere = load_adapter(tmp_path / "a").layers, load_adapter(tmp_path / "b").layers
    assert auto and all(k.startswith("unet.up_blocks.") for k in auto)
    assert set(auto) < set(everywhere) and any(k.startswith("unet.down_blocks.") for k in everywhere)


def test_target_presets_and_lists():
    assert parse_targets("attention") == ("to_q", "to_k", "to_v", "to_out.0")
    assert parse_targets("full") == TrainConfig().target_modules and "conv1" in parse_targets("full")
    assert parse_targets(" to_q, to_v ,") == ("to_q", "to_v")


def test_full_targets_adapt_the_resnet_convolutions(mini, subject_dir, tmp_path):
    """The default targets reach the 16×16 latent level, which has no attention on mini (texture lives there)."""
    cfg = TrainConfig(class_noun="thing", steps=2)
    _run(mini, subject_dir, cfg, tmp_path / "a")
    layers = load_adapter(tmp_path / "a").layers
    conv = layers["unet.up_blocks.2.resnets.0.conv1"]
    assert conv.down.dim() == 4 and conv.magnitude is not None
    assert "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2" in layers


@pytest.mark.slow
def test_data_parallel_launch_on_cpu(subject_dir, tmp_path):
    """`torchrun`/`accelerate launch` with 2 processes: DDP (gloo on CPU) trains and the main process saves."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "zipq_core",
                           "train", "--images", str(subject_dir), "--class-noun", "thing", "--steps", "4",
                           "--out", str(tmp_path / "ddp")], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('"adapter"') == 2  # both ranks finished
    assert load_adapter(tmp_path / "ddp").info["steps_done"] == 4
    assert json.loads((tmp_path / "ddp" / "train_log.json").read_text())["loss"]


def test_aspect_buckets_train_each_shape_with_its_own_micro_conditioning(tiny_sdxl_dir, tmp_path, monkeypatch):
    """Images of three shapes: every step's batch is one shape, and SDXL's time_ids carry that image's original
    size, crop and target size (not "a square original at the training resolution")."""
    from PIL import Image

    import zipq_core.train.loop as loop

    for name, size in (("wide", (256, 128)), ("tall", (96, 192)), ("square", (80, 80))):
        Image.new("RGB", size, (200, 40, 40)).save(tmp_path / f"{name}.png")
    base = load_base(str(tiny_sdxl_dir))
    cfg = TrainConfig(class_noun="thing", steps=8, resolution=192, batch_size=2, aspect_buckets=True)
    images = prepare_images(tmp_path, cfg.instance_prompt, DataConfig(resolution=192, buckets=True), token="sks")
    seen = []
    forward = loop.unet_forward

    def recording(unet, x, t, cond):
        seen.append((tuple(x.shape[-2:]), {tuple(int(v) for v in row) for row in cond.time_ids}))
        return forward(unet, x, t, cond)

    monkeypatch.setattr(loop, "unet_forward", recording)
    for _ in train_adapter(base, images, cfg, tmp_path / "out"):
        pass
    f = base.pipe.vae_scale_factor
    expected = {(t.image.height // f, t.image.width // f): t.micro_conditioning() for t in images.images}
    assert len(expected) == 3 and len(seen) == cfg.steps
    for latent_size, rows in seen:
        assert rows == {expected[latent_size]}  # one shape per batch, its own conditioning
    assert len({size for size, _ in seen}) >= 2  # the draws visit several buckets
    assert expected[(128 // f, 256 // f)] == (128, 256, 0, 0, 128, 256)  # the wide one fits its bucket exactly
    assert expected[(192 // f, 192 // f)] == (80, 80, 0, 0, 192, 192)  # the small square, upscaled: it says so
