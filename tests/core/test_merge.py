"""Merging: every method on real trained adapters; the saved low-rank file is exact; slider semantics."""

from __future__ import annotations

import pytest
import torch

from zipq_core import TrainConfig, ZipqError, load_adapter, load_base, train_adapter
from zipq_core.adapters import LoraLayer, applied, fuse_weight, resolve_module, save_adapter
from zipq_core.config import METHODS, MergeConfig
from zipq_core.data import DataConfig, prepare_images
from zipq_core.merge import merge_adapters, slider_adapters
from zipq_core.merge.parts import concat_parts

from helpers import random_layer, unet_out


def _train(base, folder, kind, token, noun, method, out):
    cfg = TrainConfig(kind=kind, token=token, class_noun=noun, steps=6, method=method, learning_rate=2e-2)
    images = prepare_images(folder, cfg.instance_prompt, DataConfig(), token=token)
    for _ in train_adapter(base, images, cfg, out):
        pass
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, subject_dir, style_dir):
    base = load_base("mini")
    tmp = tmp_path_factory.mktemp("merge")
    made = {}
    for method in ("dora", "lora"):
        made[f"subject_{method}"] = _train(base, subject_dir, "subject", "sks", subject_dir.name, method,
                                           tmp / f"subject_{method}")
        made[f"style_{method}"] = _train(base, style_dir, "style", "zkz", "star", method, tmp / f"style_{method}")
    return base, made


def test_concat_of_parts_is_exact():
    torch.manual_seed(0)
    w0 = torch.randn(12, 10)
    parts = [LoraLayer(torch.randn(3, 10) * .1, torch.randn(12, 3) * .1, 0.7, torch.rand(12) + 1),
             LoraLayer(torch.randn(2, 10) * .1, torch.randn(12, 2) * .1, 1.3, torch.rand(12) + 1)]
    merged = concat_parts(w0, parts)
    assert merged.rank == 5
    assert torch.allclose(fuse_weight(w0, [(merged, 1.0)]), fuse_weight(w0, [(p, 1.0) for p in parts]), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_saves_a_file_diffusers_reads_exactly(method, adapters, tmp_path):
    """The merged file, read by diffusers' load_lora_weights, reproduces the merged model within 1e-4."""
    from diffusers import DiffusionPipeline

    base, made = adapters
    kind = "lora" if method == "zip" else "dora"
    cfg = MergeConfig(method=method, steps=5)
    records = list(merge_adapters(base, made[f"subject_{kind}"], made[f"style_{kind}"], cfg, tmp_path / "m"))
    assert records[-1].done and records[-1].adapter_dir == tmp_path / "m"
    if cfg.learned:
        assert len(records) >= 2 and all(r.loss == r.loss for r in records[:-1])  # finite losses per step
    reference = unet_out(base)
    with applied(base.pipe, slider_adapters(tmp_path / "m", 1.0, 1.0)):
        merged_model = unet_out(base)
    with applied(base.pipe, [(load_adapter(tmp_path / "m"), 1.0)]):
        merged_file = unet_out(base)
    assert torch.allclose(merged_model, merged_file, atol=1e-4)
    assert not torch.allclose(merged_model, reference, atol=1e-4)
    pipe = DiffusionPipeline.from_pretrained("assets/mini", local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "m"))
    theirs = unet_out(type("B", (), {"unet": pipe.unet})())
    assert (theirs - merged_model).abs().max() < 1e-4


def test_a_dora_merged_with_a_lora_is_a_file_diffusers_reads_exactly(adapters, tmp_path):
    """A DoRA subject and a LoRA style (an imported file): peft wants a magnitude on every layer of a DoRA file, so
    the LoRA's layers carry m = ‖W0 + ΔW‖ — diffusers then reads the merged model, not an error."""
    from diffusers import DiffusionPipeline

    base, made = adapters
    subject = load_adapter(made["subject_dora"])
    style = load_adapter(made["style_lora"])
    extra = next(name for name, m in base.unet.named_modules()  # a layer only the LoRA adapts
                 if isinstance(m, torch.nn.Linear) and f"unet.{name}" not in subject.layers)
    out, inp = resolve_module(base.pipe, f"unet.{extra}").weight.shape
    style.layers[f"unet.{extra}"] = random_layer(out, inp, 2, dora=False, seed=3)
    save_adapter(style, tmp_path / "style")
    list(merge_adapters(base, subject, tmp_path / "style", MergeConfig(method="direct"), tmp_path / "m"))
    merged = load_adapter(tmp_path / "m")
    assert merged.use_dora and all(layer.magnitude is not None for layer in merged.layers.values())
    with applied(base.pipe, slider_adapters(tmp_path / "m", 1.0, 1.0)):
        merged_model = unet_out(base)
    pipe = DiffusionPipeline.from_pretrained("assets/mini", local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "m"))
    theirs = unet_out(type("B", (), {"unet": pipe.unet})())
    assert (theirs - merged_model).abs().max() < 1e-4


@pytest.mark.parametrize("similarity,balance", [("product", "plain"), ("cosine", "plain"), ("cosine", "relative"),
                                                ("cosine", "geometric")])
def test_learned_merge_lowers_its_loss(adapters, tmp_path, similarity, balance):
    base, made = adapters
    cfg = MergeConfig(method="zipq", steps=30, similarity=similarity, learning_rate=3e-2, balance=balance)
    records = [r for r in merge_adapters(base, made["subject_dora"], made["style_dora"], cfg, tmp_path / "m")
               if not r.done]
    first, last = records[0], records[-1]
    assert last.similarity < first.similarity  # the mergers moved apart


def test_keep_subject_adds_the_combined_prompts_term_to_the_merges_loss(adapters, tmp_path):
    """At step 1 the mergers are all 1 either way: the same reconstruction terms, so the total differs by exactly
    the subject-keeping term (the subject's images under "<caption>, in <style token> style"), which is > 0."""
    from zipq_core.merge.learned import combined_captions

    base, made = adapters
    style = load_adapter(made["style_dora"])
    assert combined_captions(["a photo of a sks shape."], style) == [f"a photo of a sks shape, in "
                                                                      f"{style.info['token']} style"]
    first = {}
    for keep in (0.0, 2.0):
        cfg = MergeConfig(method="zipq", steps=1, keep_subject=keep)
        first[keep] = next(r for r in merge_adapters(base, made["subject_dora"], made["style_dora"], cfg,
                                                     tmp_path / f"m{keep}") if not r.done)
    assert first[0.0].loss_subject == pytest.approx(first[2.0].loss_subject)
    assert first[2.0].loss > first[0.0].loss + 1e-6
    del style.info["token"]
    with pytest.raises(ZipqError, match="style adapter's token"):
        combined_captions(["a sks shape"], style)


def test_relative_balance_weighs_each_term_by_how_far_its_adapter_moves_the_base(adapters):
    """The weights come from the base's own prediction (no part shown) on each concept's batch, average 1, and are
    inverse to each adapter's effect: a target 0.1 from the base weighs 9× one 0.3 from it."""
    from zipq_core.adapters.live import live_layers
    from zipq_core.encode import encode_captions, unet_forward
    from zipq_core.merge.learned import _balance

    base, made = adapters
    subject = load_adapter(made["subject_dora"])
    torch.manual_seed(0)
    c, side = base.unet.config.in_channels, base.unet.config.sample_size
    noisy = [torch.randn(1, c, side, side) for _ in range(2)]
    t = torch.tensor([500])
    batch = [(None, encode_captions(base, [c], base.default_size)) for c in ("a sks shape", "a zkz picture")]
    with torch.no_grad(), live_layers(base.pipe, set(subject.layers)) as live:
        own = [unet_forward(base.unet, x, t, cond).float() for x, (_, cond) in zip(noisy, batch)]
        targets = (own[0] + 0.1, own[1] + 0.3)
        assert _balance("plain", live, base.unet, noisy, t, batch, targets) == (1.0, 1.0)
        assert _balance("geometric", live, base.unet, noisy, t, batch, targets) == (1.0, 1.0)  # weighed later
        for key, layer in live.items():  # a part shown: _balance must take it away for the base's prediction
            layer.parts = [subject.layers[key]]
        w_c, w_s = _balance("relative", live, base.unet, noisy, t, batch, targets)
    assert w_c == pytest.approx(1.8, rel=1e-3) and w_s == pytest.approx(0.2, rel=1e-3)
    assert (w_c + w_s) / 2 == pytest.approx(1.0)


def test_geometric_balance_weighs_each_term_by_its_own_size():
    """Weights ∝ 1 / own loss, averaging 1: the weighted terms come out equal, so the step follows
    ∇(log L_c + log L_s); the losses' graphs are not touched (the weights are plain numbers)."""
    from zipq_core.merge.learned import geometric_weights

    loss_c, loss_s = torch.tensor(0.1, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    w_c, w_s = geometric_weights(loss_c, loss_s)
    assert isinstance(w_c, float) and isinstance(w_s, float)
    assert (w_c, w_s) == (pytest.approx(1.5), pytest.approx(0.5))
    assert w_c * 0.1 == pytest.approx(w_s * 0.3)
    (w_c * loss_c + w_s * loss_s).backward()
    grads = loss_c.grad.item(), loss_s.grad.item()
    assert grads[0] / grads[1] == pytest.approx(0.3 / 0.1)  # d log L = dL / L, up to one common factor
    with pytest.raises(ZipqError, match="balance must be one of plain, relative, geometric"):
        MergeConfig(balance="equal")


def test_a_learned_merge_of_adapters_already_read_uses_their_training_views(adapters, tmp_path):
    """The CLI reads each adapter once (for the memory plan) and hands the `Adapter`s on with the folders of their
    training views: the merge is the one made from the folders themselves."""
    from zipq_core.merge import views_folder

    base, made = adapters
    cfg = MergeConfig(method="zipq", steps=3)
    paths = (made["subject_dora"], made["style_dora"])
    list(merge_adapters(base, *paths, cfg, tmp_path / "from_paths"))
    read = [load_adapter(p) for p in paths]
    list(merge_adapters(base, *read, cfg, tmp_path / "from_adapters", views=tuple(map(views_folder, paths))))
    a, b = load_adapter(tmp_path / "from_paths"), load_adapter(tmp_path / "from_adapters")
    assert a.layers.keys() == b.layers.keys()
    for key, layer in a.layers.items():
        assert torch.equal(layer.up, b.layers[key].up) and torch.equal(layer.magnitude, b.layers[key].magnitude)


def test_sliders_zero_zero_is_base_exactly(adapters, tmp_path):
    base, made = adapters
    list(merge_adapters(base, made["subject_dora"], made["style_dora"], MergeConfig(method="zipq", steps=3),
                        tmp_path / "m"))
    reference = unet_out(base)
    with applied(base.pipe, slider_adapters(tmp_path / "m", 0.0, 0.0)):
        assert torch.equal(unet_out(base), reference)
    with applied(base.pipe, slider_adapters(tmp_path / "m", 1.0, 0.0)):
        subject_only = unet_out(base)
    with applied(base.pipe, slider_adapters(tmp_path / "m", 0.0, 1.0)):
        style_only = unet_out(base)
    assert not torch.equal(subject_only, reference) and not torch.equal(style_only, subject_only)


def test_direct_merge_at_unit_weights_is_both_adapters_at_strength_one(adapters, tmp_path):
    base, made = adapters
    list(merge_adapters(base, made["subject_dora"], made["style_dora"], MergeConfig(method="direct"), tmp_path / "d"))
    with applied(base.pipe, [(load_adapter(made["subject_dora"]), 1.0), (load_adapter(made["style_dora"]), 1.0)]):
        both = unet_out(base)
    with applied(base.pipe, [(load_adapter(tmp_path / "d"), 1.0)]):
        merged = unet_out(base)
    assert torch.allclose(both, merged, atol=1e-4)


def test_zipq_refuses_lora_inputs_and_cancel_stops(adapters, tmp_path):
    import threading

    base, made = adapters
    with pytest.raises(ZipqError, match="zip"):
        list(merge_adapters(base, made["subject_lora"], made["style_lora"], MergeConfig(method="zipq"),
                            tmp_path / "x"))
    cancel = threading.Event()
    records = []
    for record in merge_adapters(base, made["subject_dora"], made["style_dora"], MergeConfig(steps=50), tmp_path / "c",
                                 cancel=cancel):
        records.append(record)
        cancel.set()
    assert records[-1].cancelled and records[-1].step <= 2


def test_blora_keeps_the_subject_in_its_content_blocks_and_the_style_in_its_style_blocks(adapters, tmp_path):
    """B-LoRA's split is the base family's unless named; the file holds exactly those layers of each adapter."""
    from zipq_core.config import family_defaults
    from zipq_core.merge.parts import blora_split

    base, made = adapters
    content, style = family_defaults("mini").blora_split
    assert blora_split(MergeConfig(method="blora"), "mini") == (tuple("unet." + p for p in content),
                                                                 tuple("unet." + p for p in style))
    cfg = MergeConfig(method="blora", blora_content=("down_blocks.", "mid_block."), blora_style=("up_blocks.",))
    list(merge_adapters(base, made["subject_dora"], made["style_dora"], cfg, tmp_path / "b"))
    subject = load_adapter(tmp_path / "b" / "parts" / "subject")
    style = load_adapter(tmp_path / "b" / "parts" / "style")
    assert subject.layers and all(k.startswith(("unet.down_blocks.", "unet.mid_block.")) for k in subject.layers)
    assert style.layers and all(k.startswith("unet.up_blocks.") for k in style.layers)
    assert len(subject.layers) == sum(k.startswith(("unet.down_blocks.", "unet.mid_block."))
                                      for k in load_adapter(made["subject_dora"]).layers)
    with pytest.raises(ZipqError, match="no block split for sd1"):
        blora_split(MergeConfig(method="blora"), "sd1")
    with pytest.raises(ZipqError, match="have none there"):
        list(merge_adapters(base, made["subject_dora"], made["style_dora"],
                            MergeConfig(method="blora", blora_content=("nowhere.",)), tmp_path / "n"))


@pytest.mark.parametrize("bad", [dict(method="sum"), dict(steps=0), dict(density=0), dict(subject_weight=2),
                                 dict(similarity="dot"), dict(balance="equal"), dict(blora_style=["up_blocks."]),
                                 dict(blora_content=("",)), dict(keep_subject=-1), dict(keep_subject=float("nan"))])
def test_merge_config_errors(bad):
    with pytest.raises(ZipqError):
        MergeConfig(**bad)


def _images(base, adapters, **cfg):
    import numpy as np

    from zipq_core import GenerateConfig, generate

    config = GenerateConfig(prompt="a photo of sks heart in zkz style", seed=3, steps=4, num_images=2, **cfg)
    return np.stack([np.asarray(im) for im in generate(base, config, adapters)])


def test_handoff_switches_to_the_detail_strength_below_its_noise_level(adapters):
    """(adapter, 1, 0): hand-off 0 never switches (= strength 1), 1 switches at once (= the base), 0.5 is neither."""
    import numpy as np

    base, made = adapters
    adapter = load_adapter(made["subject_dora"])
    reference = unet_out(base)
    full, none = _images(base, [(adapter, 1.0)]), _images(base, [])
    assert np.array_equal(_images(base, [(adapter, 1.0, 0.0)], handoff=0.0), full)
    assert np.array_equal(_images(base, [(adapter, 1.0, 0.0)], handoff=1.0), none)
    middle = _images(base, [(adapter, 1.0, 0.0)], handoff=0.5)
    assert not np.array_equal(middle, full) and not np.array_equal(middle, none)
    assert torch.equal(unet_out(base), reference), "generation must leave the base weights bit for bit"
    assert not base.unet._forward_pre_hooks, "the hand-off hook must be removed after generation"


def test_slider_subject_detail(adapters, tmp_path):
    """Detail 1 is the constant-strength merge (2-tuples, what other tools load); 0/0 stays the base exactly."""
    import numpy as np

    base, made = adapters
    list(merge_adapters(base, made["subject_dora"], made["style_dora"], MergeConfig(method="direct"), tmp_path / "m"))
    constant = slider_adapters(tmp_path / "m", 1.25, 1.0, subject_detail=1.0)
    assert [len(spec) for spec in constant] == [2, 2]
    detailed = slider_adapters(tmp_path / "m", 1.25, 1.0, subject_detail=0.5)
    assert [spec[1:] for spec in detailed] == [(1.25, 0.625), (1.0,)]
    assert np.array_equal(_images(base, slider_adapters(tmp_path / "m", 0.0, 0.0, subject_detail=0.5)),
                          _images(base, []))
    assert not np.array_equal(_images(base, detailed), _images(base, constant))
    with pytest.raises(ZipqError, match="subject detail"):
        slider_adapters(tmp_path / "m", 1.0, 1.0, subject_detail=1.5)
    from zipq_core import GenerateConfig

    with pytest.raises(ZipqError, match="hand-off"):
        GenerateConfig(handoff=1.5)
