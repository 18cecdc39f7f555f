"""What makes real bases fit a small GPU, proven on tiny models: activation-space adapters (no dense copies),
gradient checkpointing that changes nothing but memory, fp16 loss scaling, out-of-memory errors that free memory."""

from __future__ import annotations

import pytest
import torch

from zipq_core import TrainConfig, ZipqError, load_base, train_adapter
from zipq_core.adapters import fuse_weight
from zipq_core.adapters.live import LiveLayer, live_layers
from zipq_core.base import out_of_memory
from zipq_core.config import MergeConfig
from zipq_core.data import DataConfig, prepare_images
from zipq_core.merge import merge_adapters
from zipq_core.train.loop import _optimizer_step, _Run

from helpers import random_layer


def _layers(kind: str, conv: bool, out: int = 6, inp: int = 5):
    """Parts of one module: LoRA only, DoRA only, or one of each."""
    dora = {"lora": (False, False), "dora": (True, True), "mixed": (True, False)}[kind]
    return [random_layer(out, inp, 3, d, seed=i, conv=conv) for i, d in enumerate(dora)]


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("kind", ["lora", "dora", "mixed"])
def test_live_layer_equals_the_fused_weight(kind, conv):
    torch.manual_seed(0)
    module = torch.nn.Conv2d(5, 6, 3, padding=1) if conv else torch.nn.Linear(5, 6)
    x = torch.randn(2, 5, 7, 7) if conv else torch.randn(4, 5)
    parts = _layers(kind, conv)
    fused = torch.nn.Conv2d(5, 6, 3, padding=1) if conv else torch.nn.Linear(5, 6)
    fused.load_state_dict(module.state_dict())
    fused.weight.data = fuse_weight(module.weight.data, [(p, 1.0) for p in parts])
    live = LiveLayer(module)
    live.parts = parts
    assert (live(x) - fused(x)).abs().max() < 1e-5
    live.parts = []
    assert torch.equal(live(x), module(x))  # no part: the base layer itself


def test_live_layer_gradients_equal_those_through_the_fused_weight():
    torch.manual_seed(0)
    module = torch.nn.Linear(5, 6)
    x = torch.randn(4, 5)
    parts = _layers("dora", conv=False)
    for p in parts:
        p.down.requires_grad_(True)
    live = LiveLayer(module)
    live.parts = parts
    ours = torch.autograd.grad(live(x).square().sum(), [p.down for p in parts])
    weight = fuse_weight(module.weight.data, [(p, 1.0) for p in parts])
    theirs = torch.autograd.grad((x @ weight.T + module.bias).square().sum(), [p.down for p in parts])
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_live_layers_put_the_originals_back(mini):
    keys = [f"unet.{n}" for n, m in mini.unet.named_modules() if n.endswith("to_q")]
    before = dict(mini.unet.named_modules())
    with pytest.raises(RuntimeError), live_layers(mini.pipe, keys) as live:
        assert all(isinstance(mini.unet.get_submodule(k.partition(".")[2]), LiveLayer) for k in live)
        raise RuntimeError("a failing stage")
    after = dict(mini.unet.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def _train(base, folder, out, **overrides):
    cfg = TrainConfig(class_noun="thing", steps=2, learning_rate=2e-2, **overrides)
    images = prepare_images(folder, cfg.instance_prompt, DataConfig(), token=cfg.token)
    records = list(train_adapter(base, images, cfg, out))
    return records


def test_gradient_checkpointing_saves_activations_and_changes_nothing_else(subject_dir, tmp_path):
    """Same loss curve and same trained weights with checkpointing on and off; on, autograd keeps a fraction of the
    activations for backward (counted by a saved-tensor hook)."""
    from zipq_core import load_adapter

    results = {}
    for on in (False, True):
        base = load_base("mini")
        saved = [0]

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            records = _train(base, subject_dir, tmp_path / str(on), gradient_checkpointing=on, batch_size=1)
        results[on] = ([r.loss for r in records if not r.done], load_adapter(tmp_path / str(on)), saved[0])
    (loss_off, adapter_off, saved_off), (loss_on, adapter_on, saved_on) = results[False], results[True]
    assert saved_on < 0.6 * saved_off
    assert loss_on == pytest.approx(loss_off, rel=1e-5, abs=1e-7, nan_ok=True)
    for key, layer in adapter_off.layers.items():
        assert torch.allclose(layer.up, adapter_on.layers[key].up, atol=1e-6)
        assert torch.allclose(layer.down, adapter_on.layers[key].down, atol=1e-6)


def test_gradient_accumulation_of_two_halves_equals_one_batch(subject_dir, tmp_path):
    from zipq_core import load_adapter

    base = load_base("mini")
    one = _train(base, subject_dir, tmp_path / "one", batch_size=2, gradient_accumulation=1)
    two = _train(base, subject_dir, tmp_path / "two", batch_size=1, gradient_accumulation=2)
    assert len(one) == len(two)  # steps count optimizer steps either way
    a, b = load_adapter(tmp_path / "one"), load_adapter(tmp_path / "two")
    assert a.layers.keys() == b.layers.keys()
    assert all(torch.isfinite(x.up).all() for x in b.layers.values())


def _scaled_run(param: torch.nn.Parameter) -> _Run:
    optimizer = torch.optim.SGD([param], lr=0.1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    return _Run(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), optimizer, lr_sched, torch.Generator(), None, scaler)


def test_fp16_scaler_skips_a_step_with_inf_gradients_and_trains_on():
    param = torch.nn.Parameter(torch.ones(3))
    run = _scaled_run(param)
    cfg = TrainConfig(class_noun="thing", learning_rate=0.1)
    overflow = [True]

    def loss() -> torch.Tensor:
        value = (param * 2).sum()
        if overflow[0]:  # an fp16 backward that overflowed: finite loss, inf gradients
            value.register_hook(lambda g: g * float("inf"))
        return value

    _optimizer_step(run, loss, cfg)
    assert torch.equal(param.detach(), torch.ones(3))  # the step was skipped …
    assert run.scaler.get_scale() < 2.0**10  # … and the scale lowered
    overflow[0] = False
    _optimizer_step(run, loss, cfg)
    assert torch.allclose(param.detach(), torch.full((3,), 0.8))  # unscaled gradient 2, lr 0.1
    assert run.step == 2


def test_fp16_base_trains_with_fp32_adapter_weights(subject_dir, tmp_path):
    from zipq_core import load_adapter

    base = load_base("mini", dtype="fp16")
    records = _train(base, subject_dir, tmp_path / "a")
    assert records[-1].done
    adapter = load_adapter(tmp_path / "a")
    assert all(torch.isfinite(x.up).all() and x.up.abs().sum() > 0 for x in adapter.layers.values())


def test_learned_merge_with_checkpointing_gives_the_same_losses(tmp_path, subject_dir, style_dir):
    base = load_base("mini")
    _train(base, subject_dir, tmp_path / "s", method="dora")
    _train(base, style_dir, tmp_path / "t", method="dora", kind="style", token="zkz")
    losses = {}
    for on in (False, True):
        cfg = MergeConfig(method="zipq", steps=3, gradient_checkpointing=on)
        records = list(merge_adapters(base, tmp_path / "s", tmp_path / "t", cfg, tmp_path / f"m{on}"))
        losses[on] = [r.loss for r in records if not r.done]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert not base.unet.is_gradient_checkpointing  # left as it was


def test_out_of_memory_becomes_a_message_and_frees_the_stage():
    held = []

    with pytest.raises(ZipqError, match="ran out of memory: lower the batch"):
        with out_of_memory("lower the batch"):
            held.append(torch.zeros(10))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
