"""The adapter representation: DESIGN §6 strength semantics, file round trips, diffusers compatibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from zipq_core import ZipqError, load_base
from zipq_core.adapters import (
    WEIGHTS_NAME,
    LoraLayer,
    applied,
    fuse_weight,
    load_adapter,
    row_norm,
    save_adapter,
)

from helpers import adapter_for, random_layer, unet_out


def _peft_dora_linear(w0: torch.Tensor, layer: LoraLayer) -> torch.nn.Module:
    """peft's own DoRA layer over a Linear with our factors, as the reference forward."""
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False))
    model[0].weight.data = w0.clone()
    cfg = LoraConfig(r=layer.rank, lora_alpha=layer.scale * layer.rank, target_modules=["0"], use_dora=True)
    peft_model = get_peft_model(model, cfg)
    lin = peft_model.base_model.model[0]
    lin.lora_A["default"].weight.data = layer.down.clone()
    lin.lora_B["default"].weight.data = layer.up.clone()
    lin.lora_magnitude_vector["default"].weight.data = layer.magnitude.clone()
    return peft_model


def test_strength_zero_is_base_exactly_for_dora():
    w0 = torch.randn(16, 12)
    layer = random_layer(16, 12, 4, dora=True, seed=1)
    # Naively scaling only ΔW leaves m/‖W0‖·W0 ≠ W0: the semantics must interpolate the magnitude too.
    naive = (layer.magnitude / row_norm(w0))[:, None] * w0
    assert not torch.allclose(naive, w0, atol=1e-3)
    assert torch.equal(fuse_weight(w0, [(layer, 0.0)]), w0)


def test_strength_one_matches_peft_dora_forward():
    torch.manual_seed(0)
    w0 = torch.randn(16, 12)
    layer = random_layer(16, 12, 4, dora=True, seed=2)
    x = torch.randn(5, 12)
    reference = _peft_dora_linear(w0, layer)(x)
    fused = x @ fuse_weight(w0, [(layer, 1.0)]).T
    assert torch.allclose(fused, reference, atol=1e-5), (fused - reference).abs().max()


def test_strength_interpolates_lora_linearly_and_dora_magnitude():
    w0 = torch.randn(8, 6)
    lora = random_layer(8, 6, 2, dora=False, seed=3)
    assert torch.allclose(fuse_weight(w0, [(lora, 0.5)]), w0 + 0.5 * lora.delta(), atol=1e-6)
    dora = random_layer(8, 6, 2, dora=True, seed=4)
    half = fuse_weight(w0, [(dora, 0.5)])
    n0 = row_norm(w0)
    assert torch.allclose(row_norm(half), n0 + 0.5 * (dora.magnitude - n0), atol=1e-5)


def test_conv_dora_strength_ends():
    w0 = torch.randn(8, 4, 3, 3)
    layer = random_layer(8, 4, 2, dora=True, seed=5, conv=True)
    assert torch.equal(fuse_weight(w0, [(layer, 0.0)]), w0)
    assert torch.allclose(row_norm(fuse_weight(w0, [(layer, 1.0)])), layer.magnitude, atol=1e-5)


def test_save_load_round_trip(tmp_path, tiny_sdxl_dir):
    base = load_base(str(tiny_sdxl_dir))
    adapter = adapter_for(base.unet, dora=True, seed=0)
    path = save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    assert loaded.use_dora and loaded.info["token"] == "sks"
    assert set(loaded.layers) == set(adapter.layers)
    for key, layer in adapter.layers.items():
        other = loaded.layers[key]
        assert torch.equal(layer.down, other.down) and torch.equal(layer.up, other.up)
        assert torch.equal(layer.magnitude, other.magnitude) and other.scale == layer.scale
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.use_dora"] is True and meta["unet.lora_alpha"] == 2.0


@pytest.mark.parametrize("arch_dir", ["tiny_sd1_dir", "tiny_sdxl_dir"])
@pytest.mark.parametrize("dora", [False, True])
def test_diffusers_reads_our_file_as_we_apply_it(tmp_path, arch_dir, dora, request):
    """diffusers' load_lora_weights (peft, unfused) == our fused strength-1 weights; strength 0 == base."""
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(arch_dir)
    base = load_base(str(folder))
    adapter = adapter_for(base.unet, dora, seed=7)
    save_adapter(adapter, tmp_path / "a")
    reference = unet_out(base)
    with applied(base.pipe, [(load_adapter(tmp_path / "a"), 0.0)]):
        assert torch.equal(unet_out(base), reference)
    with applied(base.pipe, [(load_adapter(tmp_path / "a"), 1.0)]):
        ours = unet_out(base)
    assert torch.equal(unet_out(base), reference), "leaving applied() must restore the base bit for bit"
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "a"))
    theirs = unet_out(type("B", (), {"unet": pipe.unet})())
    assert not torch.allclose(ours, reference, atol=1e-4)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_bad_adapter_files_give_clear_errors(tmp_path, tiny_sd1_dir, tiny_sdxl_dir):
    with pytest.raises(ZipqError, match="does not exist"):
        load_adapter(tmp_path / "missing")
    (tmp_path / "evil.ckpt").write_bytes(b"not read")
    with pytest.raises(ZipqError, match="safetensors"):
        load_adapter(tmp_path / "evil.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ZipqError, match="not a readable"):
        load_adapter(tmp_path / "junk.safetensors")
    # An SDXL adapter on an SD1 model names the mismatch instead of a shape traceback.
    sdxl = load_base(str(tiny_sdxl_dir))
    save_adapter(adapter_for(sdxl.unet, True, 0), tmp_path / "x")
    with pytest.raises(ZipqError, match="another model|architecture"):
        with applied(load_base(str(tiny_sd1_dir)).pipe, [(load_adapter(tmp_path / "x"), 1.0)]):
            pass


def test_strength_out_of_range_is_refused(tiny_sd1_dir):
    base = load_base(str(tiny_sd1_dir))
    adapter = adapter_for(base.unet, False, 0)
    with pytest.raises(ZipqError, match="between 0 and 1.5"):
        with applied(base.pipe, [(adapter, 2.0)]):
            pass


def test_weights_file_name_is_diffusers_default(tmp_path, tiny_sd1_dir):
    base = load_base(str(tiny_sd1_dir))
    path = save_adapter(adapter_for(base.unet, False, 0), tmp_path / "a")
    assert path.name == WEIGHTS_NAME == "pytorch_lora_weights.safetensors"
    assert np.isfinite(load_adapter(path).layers[next(iter(load_adapter(path).layers))].down.numpy()).all()
