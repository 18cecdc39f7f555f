"""kohya export/import: round trips, DoRA scale conventions, baking DoRA into a plain LoRA."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zipq_core import ZipqError, load_base
from zipq_core.adapters import applied
from zipq_core.adapters.kohya import export_kohya, import_kohya

from helpers import adapter_for, unet_out


@pytest.mark.parametrize("arch_dir", ["tiny_sd1_dir", "tiny_sdxl_dir"])
def test_kohya_round_trip_keeps_dora_and_alpha(arch_dir, tmp_path, request):
    base = load_base(str(request.getfixturevalue(arch_dir)))
    adapter = adapter_for(base.unet, dora=True, seed=3)
    report = export_kohya(adapter, base, tmp_path / "k.safetensors", dtype=torch.float32)
    with safe_open(str(report.path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        scale = f.get_tensor(next(k for k in keys if k.endswith(".dora_scale")))
    assert all(k.startswith("lora_unet_") for k in keys) and scale.dim() == 2 and scale.shape[1] == 1
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == {"tiny_sd1_dir": "sd_v1", "tiny_sdxl_dir": "sdxl_base_v1-0"}[arch_dir]
    back = import_kohya(report.path, base)
    with applied(base.pipe, [(adapter, 1.0)]):
        ours = unet_out(base)
    with applied(base.pipe, [(back, 1.0)]):
        theirs = unet_out(base)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_baked_dora_is_a_plain_lora_close_to_the_dora(tiny_sdxl_dir, tmp_path):
    base = load_base(str(tiny_sdxl_dir))
    adapter = adapter_for(base.unet, dora=True, seed=4)
    report = export_kohya(adapter, base, tmp_path / "baked.safetensors", bake=True, dtype=torch.float32)
    with safe_open(str(report.path), framework="pt") as f:
        assert not any(k.endswith(".dora_scale") for k in f.keys())
        assert f.metadata()["ss_network_module"] == "networks.lora"
    assert report.baked and report.max_relative_error < 1.0
    baked = import_kohya(report.path, base)
    reference = unet_out(base)
    with applied(base.pipe, [(adapter, 1.0)]):
        dora = unet_out(base)
    with applied(base.pipe, [(baked, 1.0)]):
        plain = unet_out(base)
    # The baked LoRA moves the output most of the way to the DoRA's (rank-r truncation of W' − W0).
    assert (plain - dora).norm() < 0.5 * (reference - dora).norm()


def test_input_axis_dora_scale_is_refused(tiny_sd1_dir, tmp_path):
    base = load_base(str(tiny_sd1_dir))
    adapter = adapter_for(base.unet, dora=True, seed=5)
    path = export_kohya(adapter, base, tmp_path / "k.safetensors", dtype=torch.float32).path
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in [k for k in tensors if k.endswith(".dora_scale")]:
        down = tensors[key.replace(".dora_scale", ".lora_down.weight")]
        tensors[key] = torch.ones(1, down.shape[1])
    save_file(tensors, str(tmp_path / "in_axis.safetensors"))
    with pytest.raises(ZipqError, match="input column"):
        import_kohya(tmp_path / "in_axis.safetensors", base)


def test_foreign_names_are_explained(tiny_sd1_dir, tmp_path):
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(4, 2)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(ZipqError, match="do not match"):
        import_kohya(tmp_path / "x.safetensors", load_base(str(tiny_sd1_dir)))


def test_a_file_with_layers_of_several_ranks_and_scales_reads_right_in_diffusers(tiny_sd1_dir, tmp_path):
    """A merge's layers differ in rank (subject and style side by side where both adapt a layer). diffusers' kohya
    converter reads one rank and one alpha for all layers (before: the minority's change at alpha/r of the majority,
    half or double); the export writes one rank and alpha = rank everywhere, zero-padded, scales folded in."""
    from diffusers import DiffusionPipeline

    from zipq_core.adapters import Adapter, fuse_weight

    from helpers import random_layer

    base = load_base(str(tiny_sd1_dir))
    layers = {}
    for i, (name, module) in enumerate((n, m) for n, m in base.unet.named_modules()
                                       if n.endswith(("to_q", "to_k", "to_v")) and isinstance(m, torch.nn.Linear)):
        layer = random_layer(*module.weight.shape, 8 if i % 3 == 0 else 4, False, seed=i)
        layer.scale = 1.0 if i % 2 else 0.5
        layers[f"unet.{name}"] = layer
    adapter = Adapter(layers, use_dora=False)
    report = export_kohya(adapter, base, tmp_path / "mixed.safetensors", dtype=torch.float32)
    with safe_open(str(report.path), framework="pt") as f:
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")}
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert ranks == {8} and alphas == {8.0}
    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd1_dir), local_files_only=True)
    originals = {key: pipe.unet.get_submodule(key[5:]).weight.detach().clone() for key in layers}
    pipe.load_lora_weights(str(report.path))
    pipe.fuse_lora()
    for key, layer in layers.items():
        ours = fuse_weight(originals[key], [(layer, 1.0)])
        theirs = pipe.unet.get_submodule(key[5:]).weight.detach().float()
        assert (theirs - ours).norm() <= 0.01 * (ours - originals[key]).norm(), key  # the 1 % bound
    back = import_kohya(report.path, base)
    for key, layer in layers.items():
        w0 = originals[key].float()
        assert torch.allclose(fuse_weight(w0, [(back.layers[key], 1.0)]), fuse_weight(w0, [(layer, 1.0)]), atol=1e-5)
