"""K-LoRA: the per-layer top-k rule against a direct computation, generation equivalences on mini, the refusal of a
K-LoRA file, and the CLI."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from zipq_core import Cancelled, GenerateConfig, ZipqError, generate
from zipq_core.adapters import Adapter, LoraLayer, Phases, fuse_weight, resolve_module, save_adapter
from zipq_core.adapters import apply as apply_module
from zipq_core.cli import main
from zipq_core.config import KLORA_HAS_NO_FILE, KLoraConfig, MergeConfig, Sliders
from zipq_core.generation import detail_spec
from zipq_core.merge.klora import klora_generate, klora_plan, layer_scores, winners_table

from helpers import adapter_for, random_layer, unet_out

CONSTANT = Sliders(subject=1.0, style=0.8, subject_detail=1.0)
SUBJECT_EVERYWHERE = KLoraConfig(alpha=0.0, beta=1e-12)  # the style's score × ~0: the subject wins every layer
STYLE_EVERYWHERE = KLoraConfig(alpha=0.0, beta=1e12)


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def _direct_table(w0s, subject: Adapter, style: Adapter, k: int, steps: int, cfg: KLoraConfig) -> np.ndarray:
    """The rule written out element by element with numpy: sorted |ΔW|, the k largest summed, γ, the comparison."""
    def change(key, adapter):
        if key not in adapter.layers:
            return None
        layer = adapter.layers[key]
        w0 = w0s[key].double().numpy()
        delta = (layer.scale * layer.up.double().flatten(1).numpy() @ layer.down.double().flatten(1).numpy())
        delta = delta.reshape(w0.shape)
        if layer.magnitude is None:
            return delta
        v = w0 + delta
        norms = np.linalg.norm(v.reshape(v.shape[0], -1), axis=1)
        return (layer.magnitude.double().numpy() / norms).reshape(-1, *[1] * (v.ndim - 1)) * v - w0

    keys = sorted(set(subject.layers) | set(style.layers))
    s_c, s_s, ratios = [], [], []
    for key in keys:
        c, s = change(key, subject), change(key, style)
        s_c.append(0.0 if c is None else np.sort(np.abs(c).ravel())[::-1][:k].sum())
        s_s.append(0.0 if s is None else np.sort(np.abs(s).ravel())[::-1][:k].sum())
        if c is not None and s is not None:
            ratios.append(np.abs(c).sum() / np.abs(s).sum())
    gamma = np.mean(ratios)
    return np.array([[s_c[j] / gamma > s_s[j] * (cfg.alpha * i / steps + cfg.beta) for j in range(len(keys))]
                     for i in range(steps)])


def test_winners_table_matches_a_direct_computation():
    """Random LoRA and DoRA layers, linear and conv, some adapted by one adapter only."""
    shapes = {"a": (12, 10, False), "b": (16, 6, True), "c": (9, 9, False), "d": (8, 5, False), "e": (7, 4, True)}
    torch.manual_seed(0)
    w0s = {k: (torch.randn(o, i, 3, 3) if conv else torch.randn(o, i)) for k, (o, i, conv) in shapes.items()}
    subject = Adapter({k: random_layer(o, i, 3, dora=k in "ab", seed=n, conv=conv)
                       for n, (k, (o, i, conv)) in enumerate(shapes.items()) if k != "e"}, use_dora=True)
    style = Adapter({k: random_layer(o, i, 2, dora=k in "be", seed=50 + n, conv=conv)
                     for n, (k, (o, i, conv)) in enumerate(shapes.items()) if k != "d"}, use_dora=True)
    for k in (5, 40):
        cfg = KLoraConfig(top_k=k)
        scores = layer_scores(w0s, subject, style, k)
        table = winners_table(scores, 10, cfg).numpy()
        assert scores.keys == sorted(shapes)
        assert np.array_equal(table, _direct_table(w0s, subject, style, k, 10, cfg))
        assert table[:, scores.keys.index("d")].all(), "a layer only the subject adapts is always the subject's"
        assert not table[:, scores.keys.index("e")].any(), "a layer only the style adapts is always the style's"


def test_a_dominant_subject_layer_flips_to_the_style_as_the_factor_grows():
    """ΔW_c = 2M, ΔW_s = M in layer a; the reverse in b: γ = (2 + 1/2)/2 = 1.25. Layer a: 2/1.25 = 1.6 > 1.5·p + 0.5
    until p > 0.733 (steps 0-7 of 10 the subject's, 8-9 the style's); layer b: 0.4 < 0.5, the style's throughout."""
    torch.manual_seed(1)
    down, up = torch.randn(2, 6), torch.randn(5, 2)
    lora = lambda factor: LoraLayer(down=down.clone(), up=factor * up, scale=1.0)
    subject = Adapter({"a": lora(2.0), "b": lora(1.0)}, use_dora=False)
    style = Adapter({"a": lora(1.0), "b": lora(2.0)}, use_dora=False)
    scores = layer_scores({"a": torch.zeros(5, 6), "b": torch.zeros(5, 6)}, subject, style, k=4)
    assert scores.gamma == pytest.approx(1.25)
    table = winners_table(scores, 10, KLoraConfig(top_k=4))
    assert table[:, 0].tolist() == [True] * 8 + [False] * 2
    assert not table[:, 1].any()
    assert winners_table(scores, 10, KLoraConfig(top_k=4, alpha=0.0, beta=1.0))[:, 0].all()  # no ramp, no flip


@pytest.fixture(scope="module")
def pair(mini):
    subject = adapter_for(mini.unet, dora=True, seed=0)
    style = adapter_for(mini.unet, dora=True, seed=100)
    style.info = {"kind": "style", "token": "zkz"}
    return mini, subject, style


def test_one_adapter_winning_every_layer_is_that_adapter_alone(pair):
    """Bit-equal images, the subject's detail strength below the hand-off included."""
    base, subject, style = pair
    config = GenerateConfig(prompt="a photo of sks heart", seed=3, steps=4)
    sliders = Sliders(subject=1.2, style=0.8, subject_detail=0.5)
    alone = _arrays(generate(base, config, [detail_spec(subject, 1.2, 0.5)]))
    assert np.array_equal(_arrays(klora_generate(base, config, subject, style, sliders, SUBJECT_EVERYWHERE)), alone)
    alone = _arrays(generate(base, config, [(style, 0.8)]))
    assert np.array_equal(_arrays(klora_generate(base, config, subject, style, sliders, STYLE_EVERYWHERE)), alone)


def test_klora_switches_layers_and_restores_the_base_bit_for_bit(pair):
    base, subject, style = pair
    reference = unet_out(base)
    config = GenerateConfig(prompt="a photo of sks heart", seed=3, steps=6)
    plan = klora_plan(base, subject, style, CONSTANT)
    table = winners_table(plan.scores, config.steps, KLoraConfig())
    assert table[0].any() and not table[-1].all() and (table[0] != table[-1]).any(), "the default rule switches"
    mixed = _arrays(klora_generate(base, config, subject, style, CONSTANT))
    assert torch.equal(unet_out(base), reference)
    for alone in ([(subject, 1.0)], [(style, 0.8)], [(subject, 1.0), (style, 0.8)]):
        assert not np.array_equal(mixed, _arrays(generate(base, config, alone)))


def test_progress_per_step_and_cancel(pair):
    base, subject, style = pair
    reference = unet_out(base)
    config = GenerateConfig(prompt="a photo of sks heart", steps=3, candidates=2)
    seen = []
    klora_generate(base, config, subject, style, CONSTANT, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 2 * 3 + 2) for i in range(1, 9)]  # 2 rounds × 3 steps, then the two judges
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        klora_generate(base, config, subject, style, CONSTANT, cancel=cancel,
                       on_step=lambda done, total: cancel.set())
    assert torch.equal(unet_out(base), reference)


def test_phases_re_fuse_only_the_layers_that_change(mini, monkeypatch):
    """Switching between settings that differ in one layer fuses that layer only; the others keep their tensors."""
    adapter = adapter_for(mini.unet, dora=True, seed=7)
    keys = sorted(adapter.layers)
    without_first = Adapter({k: x for k, x in adapter.layers.items() if k != keys[0]}, use_dora=True)
    other = Adapter({keys[1]: adapter_for(mini.unet, dora=True, seed=9).layers[keys[1]]}, use_dora=True)
    fused = []
    real = apply_module._checked_fuse
    monkeypatch.setattr(apply_module, "_checked_fuse", lambda key, *a: fused.append(key) or real(key, *a))
    original = resolve_module(mini.pipe, keys[0]).weight.data.clone()
    state = Phases(mini.pipe, [[(adapter, 1.0)], [(without_first, 1.0)],
                               [(Adapter({k: x for k, x in without_first.layers.items() if k != keys[1]}, True), 1.0),
                                (other, 1.0)]])
    try:
        state.select(0)
        assert len(fused) == len(keys)
        pointers = {k: resolve_module(mini.pipe, k).weight.data_ptr() for k in keys}
        fused.clear()
        state.select(1)
        assert fused == [] and torch.equal(resolve_module(mini.pipe, keys[0]).weight.data, original)
        assert all(resolve_module(mini.pipe, k).weight.data_ptr() == pointers[k] for k in keys[1:])
        state.select(2)
        assert fused == [keys[1]]
        w0 = state.originals[keys[1]]
        expected = fuse_weight(w0, [(other.layers[keys[1]], 1.0)])
        assert torch.equal(resolve_module(mini.pipe, keys[1]).weight.data, expected.to(w0.dtype))
    finally:
        state.restore()


def test_a_klora_file_is_refused_with_the_generate_command(tmp_path, capsys):
    with pytest.raises(ZipqError, match="generate --klora"):
        MergeConfig(method="klora")
    code = main(["merge", "--subject", str(tmp_path / "s"), "--style", str(tmp_path / "t"), "--method", "klora",
                 "--out", str(tmp_path / "m")])
    assert code == 2 and KLORA_HAS_NO_FILE in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_cli_generates_with_klora_on_mini(pair, tmp_path, capsys):
    """The CLI's generate command in process (the same parser and command a user runs)."""
    base, subject, style = pair
    for name, adapter in (("subject", subject), ("style", style)):
        save_adapter(adapter, tmp_path / name)
    common = ["--base", "mini", "--prompt", "a photo of sks heart", "--seed", "2", "--steps", "3"]
    code = main(["generate", "--klora", str(tmp_path / "subject"), str(tmp_path / "style"), "--candidates", "2",
                 "--subject-strength", "1", "--style-strength", "0.8", "--subject-detail", "1", *common,
                 "--out", str(tmp_path / "k.png")])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    summary = json.loads(out.out)
    assert summary["candidates"] == 2 and (tmp_path / "k.png").exists()
    info = summary["klora"]
    assert info["top_k"] == 64 and info["layers"] == len(subject.layers)
    assert info["subject_layers_first_step"] > info["subject_layers_last_step"]
    config = GenerateConfig(prompt="a photo of sks heart", seed=2, steps=3, candidates=2)
    ours = klora_generate(base, config, tmp_path / "subject", tmp_path / "style", CONSTANT)
    assert np.array_equal(_arrays(ours), np.asarray(Image.open(tmp_path / "k.png"))[None])
    code = main(["generate", "--klora", str(tmp_path / "subject"), str(tmp_path / "style"), "--merged",
                 str(tmp_path / "subject"), *common, "--out", str(tmp_path / "x.png")])
    assert code == 2 and "--klora generates from its two adapters alone" in capsys.readouterr().err


def test_klora_config_checks():
    for bad in (dict(top_k=0), dict(alpha=-1.0), dict(beta=float("nan"))):
        with pytest.raises(ZipqError, match="K-LoRA's"):
            KLoraConfig(**bad)
