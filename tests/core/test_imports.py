"""Imports of the files artists bring (adapters.imports): files built the way each tool writes them (names, shapes,
alphas, dtypes) import to the weights that tool computes, or are refused with a message saying what they are.

The references are independent of the importer: diffusers' own LDM → diffusers UNet converter for the SGM names,
peft's own LoHa/LoKr/LoRA layers for their ΔW, and the DoRA formulas of LyCORIS (`modules/locon.py`, wd_on_out)
and A1111 (`extensions-builtin/Lora/network.py` `apply_weight_decompose`) written out here from their sources.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zipq_core import load_base
from zipq_core.adapters import fuse_weight, import_adapter, resolve_module, row_norm, save_adapter
from zipq_core.adapters.imports import SVD_TOLERANCE, describe_file, ldm_block_prefixes, ldm_path
from zipq_core.errors import ZipqError

from helpers import adapter_for

BOUND = 0.01  # the bound: ‖ΔW_ours − ΔW_file‖ / ‖ΔW_file‖ per layer
Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # mini: Linear 64 → 64
K2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # mini: Linear 128 → 64
CONV = "down_blocks.1.resnets.0.conv1"  # mini: Conv2d 32 → 64, 3×3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _w0(base, key: str) -> torch.Tensor:
    return resolve_module(base.pipe, key).weight.detach().float()


def _kohya_lora(out: int, inp: int, r: int, seed: int, conv: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((r, inp, 3, 3) if conv else (r, inp), generator=g) * 0.1
    up = torch.randn((out, r, 1, 1) if conv else (out, r), generator=g) * 0.1
    return {"lora_down.weight": down.half(), "lora_up.weight": up.half(), "alpha": torch.tensor(r / 2).half()}


def _kohya_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """kohya's ΔW: alpha / r · up @ down (sd-scripts networks/lora.py LoRAModule.merge_to)."""
    down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
    delta = up.flatten(1) @ down.flatten(1) * float(parts["alpha"]) / down.shape[0]
    return delta.view(up.shape[0], *down.shape[1:])


def _write(path: Path, layers: dict[str, dict[str, torch.Tensor]], metadata: dict | None = None) -> Path:
    save_file({f"{name}.{k}": v.contiguous() for name, parts in layers.items() for k, v in parts.items()}, str(path),
              metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------------------
# Names: LDM/SGM ↔ diffusers, text encoders
# ---------------------------------------------------------------------------------------------------------

# Published UNet configs (SDXL base 1.0 and SD1.5, from their unet/config.json), built on the meta device: no weights.
SDXL_UNET = dict(sample_size=128, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SD15_UNET = dict(sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
                 layers_per_block=2, attention_head_dim=8, cross_attention_dim=768)


@pytest.mark.parametrize("which", ["sdxl", "sd15", "mini"])
def test_ldm_names_agree_with_diffusers_single_file_converter(which, mini):
    """Every UNet parameter renamed to its LDM name by our table comes back to its own name through diffusers'
    `convert_ldm_unet_checkpoint` (the converter diffusers uses for original checkpoints): each parameter is
    tagged with its index, so a swapped pair of same-shaped modules would fail."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if which == "mini":
        unet = mini.pipe.unet
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**(SDXL_UNET if which == "sdxl" else SD15_UNET))
    prefixes = ldm_block_prefixes(unet.config)
    keys = list(unet.state_dict())
    ldm = {}
    for i, key in enumerate(keys):
        module, _, param = key.rpartition(".")
        name = ldm_path(module, prefixes)
        assert name is not None, key
        ldm[f"model.diffusion_model.{name}.{param}"] = torch.tensor([float(i)])
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(keys)
    assert all(float(back[key]) == i for i, key in enumerate(keys))
    if which == "sdxl":  # sd-scripts' own names for SDXL (as in its files) name these modules
        assert ldm_path("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", prefixes) == \
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        assert ldm_path("up_blocks.0.upsamplers.0.conv", prefixes) == "output_blocks.2.2.conv"


def test_sgm_named_sdxl_file_maps_every_layer_and_fuses_right(tiny_sdxl_dir, tmp_path):
    """An sd-scripts SDXL file (SGM UNet names, lora_te1_/lora_te2_ text_model names, fp16, alpha = r/2) for every
    Linear/Conv2d: each layer lands on its module (named spot checks below) with kohya's ΔW exactly."""
    base = load_base(str(tiny_sdxl_dir))
    prefixes = ldm_block_prefixes(base.pipe.unet.config)
    layers, expected = {}, {}
    for component, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")):
        for name, module in getattr(base.pipe, component).named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or name.endswith("text_projection"):
                continue
            path = ldm_path(name, prefixes) if component == "unet" else "text_model." + name.removeprefix(
                "text_model.")
            kohya = f"{prefix}_{path.replace('.', '_')}"
            conv = isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
            parts = _kohya_lora(module.weight.shape[0], module.weight.shape[1], 4, len(layers), conv)
            if isinstance(module, torch.nn.Conv2d) and not conv:
                parts = {k: v.view(*v.shape, 1, 1) if v.dim() == 2 else v for k, v in parts.items()}
            layers[kohya], expected[kohya] = parts, f"{component}.{name}"
    adapter = import_adapter(_write(tmp_path / "sdxl_sgm.safetensors", layers), base)
    assert len(adapter.layers) == len(layers)
    for kohya, key in expected.items():
        assert torch.allclose(adapter.layers[key].delta(), _kohya_delta(layers[kohya]), atol=1e-6), kohya
    spot = {  # hand-derived from the LDM numbering (1 layer per block here; SDXL's input_blocks_4_1 is the same rule)
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k":
            "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_input_blocks_2_0_op": "unet.down_blocks.0.downsamplers.0.conv",
        "lora_unet_input_blocks_1_0_emb_layers_1": "unet.down_blocks.0.resnets.0.time_emb_proj",
        "lora_unet_middle_block_1_proj_in": "unet.mid_block.attentions.0.proj_in",
        "lora_unet_middle_block_2_in_layers_2": "unet.mid_block.resnets.1.conv1",
        "lora_unet_output_blocks_1_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_3_0_skip_connection": "unet.up_blocks.1.resnets.1.conv_shortcut",
        "lora_unet_output_blocks_0_0_out_layers_3": "unet.up_blocks.0.resnets.0.conv2",
        "lora_unet_time_embed_0": "unet.time_embedding.linear_1",
        "lora_unet_label_emb_0_0": "unet.add_embedding.linear_1",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.encoder.layers.0.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": "text_encoder_2.text_model.encoder.layers.1.mlp.fc2",
    }
    for kohya, key in spot.items():
        assert expected[kohya] == key
    assert "original (LDM/SGM) names" in describe_file(tmp_path / "sdxl_sgm.safetensors")
    _cli_generate(tiny_sdxl_dir, tmp_path / "sdxl_sgm.safetensors", tmp_path / "sdxl.png")
    _cli_merge_and_generate(tiny_sdxl_dir, tmp_path / "sdxl_sgm.safetensors", tmp_path / "sdxl_sgm.safetensors",
                            tmp_path)


def _cli_generate(base_dir: Path, adapter: Path, out: Path) -> None:
    from zipq_core.cli import main

    assert main(["generate", "--base", str(base_dir), "--adapter", f"{adapter}:0.5", "--prompt", "a dog",
                 "--steps", "2", "--out", str(out)]) == 0
    assert out.exists()


def _cli_merge_and_generate(base_dir: Path, subject: Path, style: Path, out: Path) -> None:
    """The imported files as the subject and the style of a merge, then generation with the merge's sliders."""
    from zipq_core.cli import main

    assert main(["merge", "--base", str(base_dir), "--subject", str(subject), "--style", str(style),
                 "--method", "direct", "--out", str(out / "merged")]) == 0
    assert main(["generate", "--base", str(base_dir), "--merged", str(out / "merged"), "--prompt", "a dog",
                 "--steps", "2", "--candidates", "1", "--out", str(out / "merged.png")]) == 0
    assert (out / "merged.png").exists()


def test_sd1_files_map_te_and_sgm_names_and_change_the_output(tiny_sd1_dir, tmp_path):
    """SD1.x: `lora_te_text_model_…` keys reach transformers 5's `encoder.layers…`; an A1111-style SGM UNet name
    and its diffusers-style twin give the same layer; the text encoder's output changes by the LoRA's effect."""
    base = load_base(str(tiny_sd1_dir))
    te_q = base.pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    parts = _kohya_lora(*te_q.weight.shape, 4, 0)
    unet_parts = _kohya_lora(32, 32, 4, 1)
    sgm = _write(tmp_path / "sd1_sgm.safetensors", {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": parts,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": unet_parts})
    named = _write(tmp_path / "sd1_diffusers_names.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": unet_parts})
    a, b = import_adapter(sgm, base), import_adapter(named, base)
    te_key = "text_encoder.encoder.layers.0.self_attn.q_proj"
    unet_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert set(a.layers) == {te_key, unet_key} and set(b.layers) == {unet_key}
    assert torch.equal(a.layers[unet_key].delta(), b.layers[unet_key].delta())
    x = torch.randn(3, te_q.in_features)
    with torch.no_grad():
        changed = x @ fuse_weight(te_q.weight, [(a.layers[te_key], 1.0)]).T - te_q(x) + te_q.bias
    assert torch.allclose(changed, x @ _kohya_delta(parts).T, atol=1e-5)
    _cli_generate(tiny_sd1_dir, sgm, tmp_path / "sd1.png")
    _cli_merge_and_generate(tiny_sd1_dir, sgm, named, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# DoRA in both dora_scale conventions
# ---------------------------------------------------------------------------------------------------------

def _lycoris_out(w0, delta, scale):  # LyCORIS locon.py, wd_on_out=True: per output row of W0 + ΔW
    merged = w0 + delta
    return merged * (scale.view(-1, *[1] * (w0.dim() - 1)) / row_norm(merged).view(-1, *[1] * (w0.dim() - 1)))


def _a1111_in(w0, delta, scale):  # A1111 network.py apply_weight_decompose: per input column of W0 + ΔW
    merged = w0 + delta
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    return merged * (scale.flatten() / norm).view(1, -1, *[1] * (w0.dim() - 2))


@pytest.mark.parametrize("key", [Q, K2, CONV])
def test_dora_scale_both_conventions(mini, tmp_path, key):
    w0 = _w0(mini, f"unet.{key}")
    conv = w0.dim() == 4
    parts = _kohya_lora(w0.shape[0], w0.shape[1], 4, 7, conv)
    delta = _kohya_delta(parts)
    g = torch.Generator().manual_seed(3)
    by_row = row_norm(w0 + delta) * (1 + 0.2 * torch.rand(w0.shape[0], generator=g))
    by_col = (w0 + delta).transpose(0, 1).reshape(w0.shape[1], -1).norm(dim=1) * (
        1 + 0.2 * torch.rand(w0.shape[1], generator=g))
    name = f"lora_unet_{key.replace('.', '_')}"
    shape_row = (-1, 1, 1, 1) if conv else (-1, 1)
    shape_col = (1, -1, 1, 1) if conv else (1, -1)
    for dora_scale, reference in ((by_row.view(shape_row), _lycoris_out(w0, delta, by_row)),
                                  (by_col.view(shape_col), _a1111_in(w0, delta, by_col))):
        file = _write(tmp_path / "dora.safetensors", {name: {**parts, "dora_scale": dora_scale.half()}})
        adapter = import_adapter(file, mini)
        assert adapter.use_dora
        fused = fuse_weight(w0, [(adapter.layers[f"unet.{key}"], 1.0)])
        # the file's scale is fp16: the reference uses the same rounded values
        reference = (_lycoris_out if dora_scale.shape[0] != 1 else _a1111_in)(w0, delta, dora_scale.half().float())
        assert _rel(fused - w0, reference - w0) <= BOUND
    assert adapter.info["conversion"]["max_relative_error"] <= SVD_TOLERANCE  # the column form was converted


# ---------------------------------------------------------------------------------------------------------
# LoHa, LoKr: peft's own layers as the reference
# ---------------------------------------------------------------------------------------------------------

def _peft_layer(kind: str, module: torch.nn.Module, seed: int, **options):
    """peft's LoHa/LoKr layer around a copy of `module`, with random (non-zero) factors."""
    import copy

    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.layer = copy.deepcopy(module)
    cls = LoHaConfig if kind == "loha" else LoKrConfig
    config = cls(target_modules=["layer"], init_weights=False, **options)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, holder)
    with torch.no_grad():
        for name, param in holder.layer.named_parameters():
            if name.startswith(("hada_", "lokr_")):
                param.copy_(torch.randn_like(param) * 0.3)
    return holder.layer


def _file_tensors(layer) -> dict[str, torch.Tensor]:
    """The factors under LyCORIS's key names, fp16 as LyCORIS saves them, and alpha."""
    out = {n.split(".")[0]: p.detach().half() for n, p in layer.named_parameters() if n.startswith(("hada_", "lokr_"))}
    return {**out, "alpha": torch.tensor(float(layer.alpha["default"]))}


CASES = [("loha", Q, {"r": 4, "alpha": 6}), ("loha", CONV, {"r": 3, "alpha": 3, "use_effective_conv2d": True}),
         ("loha", CONV, {"r": 3, "alpha": 2}), ("loha", Q, {"r": 9, "alpha": 9}),  # 81 > 64: SVD fallback
         ("lokr", Q, {"r": 2, "alpha": 4, "decompose_both": True, "decompose_factor": 8}),
         # both factors full: LyCORIS then writes alpha = r and every reader takes scale 1
         ("lokr", Q, {"r": 4, "alpha": 4, "decompose_factor": 8}),
         ("lokr", K2, {"r": 2, "alpha": 4, "decompose_factor": 4}),
         ("lokr", CONV, {"r": 2, "alpha": 2, "use_effective_conv2d": True, "decompose_factor": 4})]


@pytest.mark.parametrize("kind,key,options", CASES)
def test_loha_lokr_import_as_peft_computes_them(mini, tmp_path, kind, key, options):
    module = resolve_module(mini.pipe, f"unet.{key}")
    layer = _peft_layer(kind, module, 0, **options)
    tensors = _file_tensors(layer)
    for name, t in tensors.items():  # peft's reference from the same fp16-rounded factors the file holds
        if name != "alpha":
            getattr(layer, name)["default"].data.copy_(t.float())
    with torch.no_grad():
        reference = layer.get_delta_weight("default").float()
    file = _write(tmp_path / f"{kind}.safetensors", {f"lora_unet_{key.replace('.', '_')}": tensors})
    adapter = import_adapter(file, mini)
    ours = adapter.layers[f"unet.{key}"]
    assert _rel(ours.delta(), reference) <= (SVD_TOLERANCE if "conversion" in adapter.info else 1e-5)
    out, flat_in = reference.shape[0], reference[0].numel()
    assert ours.rank <= min(out, flat_in)
    assert ("conversion" in adapter.info) == (kind == "loha" and options["r"] ** 2 > min(out, flat_in))
    assert ("LoHa" if kind == "loha" else "LoKr") in describe_file(file)


def test_locon_tucker_bf16_acts_as_its_three_convolutions(mini, tmp_path):
    """A LyCORIS LoCon conv layer in Tucker form (lora_down 1×1, lora_mid k×k, lora_up 1×1; bf16 as saved with
    --save_precision bf16): the imported ΔW convolves an input as the three convolutions in a row do."""
    w0 = _w0(mini, f"unet.{CONV}")
    g = torch.Generator().manual_seed(5)
    r, alpha = 4, 2.0
    down, mid, up = (torch.randn(s, generator=g).bfloat16() for s in ((r, w0.shape[1], 1, 1), (r, r, 3, 3),
                                                                      (w0.shape[0], r, 1, 1)))
    file = _write(tmp_path / "locon.safetensors", {f"lora_unet_{CONV.replace('.', '_')}": {
        "lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up, "alpha": torch.tensor(alpha)}})
    layer = import_adapter(file, mini).layers[f"unet.{CONV}"]
    x = torch.randn(1, w0.shape[1], 8, 8, generator=g)
    conv = torch.nn.functional.conv2d
    expected = conv(conv(conv(x, down.float()), mid.float(), padding=1), up.float()) * alpha / r
    assert torch.allclose(conv(x, layer.delta(), padding=1), expected, atol=1e-4)
    assert "LyCORIS LoRA" in describe_file(file)


# ---------------------------------------------------------------------------------------------------------
# peft folders, diffusers files, old attention-processor names
# ---------------------------------------------------------------------------------------------------------

def test_peft_folder_alpha_and_rank_pattern_honoured(mini, tmp_path):
    """A folder written by peft's save_pretrained: lora_alpha, rank_pattern and alpha_pattern give each layer
    peft's own scaling (not alpha = r)."""
    import copy

    from peft import LoraConfig, get_peft_model

    unet = copy.deepcopy(mini.pipe.unet)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False,
                        rank_pattern={"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 2},
                        alpha_pattern={"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 6,
                                       "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": 1})
    torch.manual_seed(0)
    model = get_peft_model(unet, config)
    model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    adapter = import_adapter(tmp_path / "peft", mini)
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = "unet." + name.removeprefix("base_model.model.")
            with torch.no_grad():
                assert _rel(adapter.layers[key].delta(), module.get_delta_weight("default")) < 1e-6, key
            checked += 1
    assert checked == len(adapter.layers) > 10
    assert adapter.layers[f"unet.{Q}"].rank == 2 and adapter.layers[f"unet.{Q}"].scale == 3.0
    assert "peft LORA folder" in describe_file(tmp_path / "peft")


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_peft_folders_of_dora_loha_lokr_fuse_as_peft_merges_them(mini, tmp_path, kind):
    """peft's save_pretrained of a DoRA, LoHa or LoKr UNet adapter (adapter_config.json with alpha ≠ r): our fused
    weights equal the weights peft's own merge_and_unload writes, layer by layer."""
    import copy

    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

    unet = copy.deepcopy(mini.pipe.unet)
    targets = ["to_q", "to_v", "conv1"]
    config = {"dora": LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=targets, init_lora_weights=False),
              "loha": LoHaConfig(r=2, alpha=3, target_modules=targets, init_weights=False),
              "lokr": LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False, decompose_both=True,
                                 decompose_factor=4)}[kind]
    torch.manual_seed(0)
    model = get_peft_model(unet, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "hada_w2_a" in name or "lokr_w1" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.05)  # non-zero where peft's init leaves zeros
    model.save_pretrained(tmp_path / "peft")
    adapter = import_adapter(tmp_path / "peft", mini)
    merged = dict(model.merge_and_unload().named_modules())
    assert len(adapter.layers) > 10 and adapter.use_dora == (kind == "dora")
    for key, layer in adapter.layers.items():
        w0 = _w0(mini, key)
        expected = merged[key.partition(".")[2]].weight.detach().float()
        ours = fuse_weight(w0, [(layer, 1.0)])
        assert _rel(ours - w0, expected - w0) < 1e-4, key


def test_diffusers_files_with_and_without_metadata_and_old_processor_names(mini, tmp_path):
    adapter = adapter_for(mini.pipe.unet, dora=False, seed=0)  # scale 0.5: alpha = r / 2
    path = save_adapter(adapter, tmp_path / "ours")
    assert all(_rel(import_adapter(path, mini).layers[k].delta(), x.delta()) < 1e-6 for k, x in adapter.layers.items())
    tensors = load_file(str(path))
    bare = tmp_path / "no_metadata.safetensors"
    save_file(tensors, str(bare))  # without lora_adapter_metadata diffusers reads alpha = r: scale 1
    plain = import_adapter(bare, mini)
    assert all(layer.scale == 1.0 for layer in plain.layers.values())
    assert "without metadata" in describe_file(bare)
    old = {}  # diffusers ≤ 0.20 attention processors: to_q_lora / to_out_lora, no alpha (scale 1)
    for key, layer in adapter.layers.items():
        stem, _, proj = key.rpartition(".")
        old[f"{stem}.processor.{proj}_lora.down.weight"] = layer.down
        old[f"{stem}.processor.{proj}_lora.up.weight"] = layer.up
    g = torch.Generator().manual_seed(1)
    out_stem = f"unet.{Q}".rpartition(".")[0]
    old[f"{out_stem}.processor.to_out_lora.down.weight"] = torch.randn(4, 64, generator=g)
    old[f"{out_stem}.processor.to_out_lora.up.weight"] = torch.randn(64, 4, generator=g)
    te = "text_encoder.text_model.encoder.layers.0.self_attn"  # the text encoder as diffusers ≤ 0.20 named it
    old[f"{te}.to_k_lora.down.weight"], old[f"{te}.to_k_lora.up.weight"] = torch.ones(2, 64), torch.ones(64, 2)
    old[f"{te}.v_proj.lora_linear_layer.down.weight"] = torch.ones(2, 64)
    old[f"{te}.v_proj.lora_linear_layer.up.weight"] = torch.ones(64, 2)
    save_file(old, str(tmp_path / "old.safetensors"))
    imported = import_adapter(tmp_path / "old.safetensors", mini)
    te_keys = {"text_encoder.encoder.layers.0.self_attn.k_proj", "text_encoder.encoder.layers.0.self_attn.v_proj"}
    assert set(imported.layers) == set(adapter.layers) | {f"{out_stem}.to_out.0"} | te_keys
    for key, layer in adapter.layers.items():
        assert torch.allclose(imported.layers[key].delta(), layer.up @ layer.down)
    assert "attention-processor" in describe_file(tmp_path / "old.safetensors")


@pytest.mark.parametrize("fmt", ["comfyui", "lycoris", "a1111", "diffusers"])
def test_our_exports_import_back_within_the_bound(mini, tmp_path, fmt):
    """import(export(x)) = x within 1 % per layer for a DoRA: the ComfyUI file's dora_scale (solved for ComfyUI's
    ÷‖W0‖, flagged in its header) and the A1111 file's baked LoRA both come back to the studio's weights."""
    from zipq_core.adapters.export import export_adapter

    adapter = adapter_for(mini.pipe.unet, dora=True, seed=0)
    back = import_adapter(export_adapter(adapter, mini, fmt, tmp_path / f"{fmt}.safetensors").path, mini)
    for key, layer in adapter.layers.items():
        w0 = _w0(mini, key)
        studio = fuse_weight(w0, [(layer, 1.0)])
        assert _rel(fuse_weight(w0, [(back.layers[key], 1.0)]) - w0, studio - w0) <= BOUND, key


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------

def test_refusals_name_the_file_and_what_to_do(mini, tiny_sd1_dir, tmp_path):
    pickle = tmp_path / "style.ckpt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickle)
    with pytest.raises(ZipqError, match=r"(?s)pickled.*weights_only=True"):
        import_adapter(pickle, mini)
    assert "pickled" in describe_file(pickle)
    name = f"lora_unet_{Q.replace('.', '_')}"
    file = _write(tmp_path / "kohya.safetensors", {name: _kohya_lora(64, 64, 4, 0)})
    with pytest.raises(ZipqError, match="over the adapter size limit.*ZIPQ_MAX_ADAPTER_BYTES"):
        import_adapter(file, mini, max_bytes=100)
    with pytest.raises(ZipqError, match="kohya LoRA.*--base"):
        import_adapter(file)
    flux = _write(tmp_path / "flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": _kohya_lora(8, 8, 2, 0)},
                  {"modelspec.architecture": "flux-1-dev/lora"})
    with pytest.raises(ZipqError, match="for Flux"):
        import_adapter(flux, mini)
    sd1 = load_base(str(tiny_sd1_dir))  # an SD1.x file (cross-attention 768) on an SDXL-architecture base
    real_sd1 = _write(tmp_path / "sd1.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": _kohya_lora(64, 768, 4, 0)})
    with pytest.raises(ZipqError, match=r"made for SD1\.x.*--base"):
        import_adapter(real_sd1, mini)
    with pytest.raises(ZipqError, match="match no layer|made for"):
        import_adapter(real_sd1, sd1)
    full = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(full))
    with pytest.raises(ZipqError, match="full Stable Diffusion checkpoint.*--base model.safetensors"):
        import_adapter(full, mini)
    oft = _write(tmp_path / "oft.safetensors", {name: {"oft_blocks": torch.zeros(4, 16, 16)}})
    with pytest.raises(ZipqError, match="OFT.*supported: LoRA"):
        import_adapter(oft, mini)


# ---------------------------------------------------------------------------------------------------------
# The CLI: generate with a kohya file, merge a kohya file with a LoHa
# ---------------------------------------------------------------------------------------------------------

def test_cli_generate_and_merge_take_kohya_and_loha_files(mini, tmp_path, capsys):
    from zipq_core.cli import main

    layers = {}
    for i, (name, module) in enumerate(mini.pipe.unet.named_modules()):
        if name.endswith(("attn1.to_q", "attn1.to_v")):
            layers[f"lora_unet_{name.replace('.', '_')}"] = _kohya_lora(*module.weight.shape, 4, i)
    kohya = _write(tmp_path / "subject_kohya.safetensors", layers, {"modelspec.trigger_phrase": "sks"})
    g = torch.Generator().manual_seed(0)
    loha = {name: {"hada_w1_a": torch.randn(p["lora_up.weight"].shape[0], 2, generator=g).half(),
                   "hada_w1_b": torch.randn(2, p["lora_down.weight"].shape[1], generator=g).half(),
                   "hada_w2_a": torch.randn(p["lora_up.weight"].shape[0], 2, generator=g).half(),
                   "hada_w2_b": torch.randn(2, p["lora_down.weight"].shape[1], generator=g).half() * 0.1,
                   "alpha": torch.tensor(1.0)} for name, p in layers.items()}
    style = _write(tmp_path / "style_loha.safetensors", loha)
    common = ["--base", "mini", "--prompt", "a photo of sks dog", "--steps", "2", "--seed", "0"]
    assert main(["generate", *common, "--adapter", f"{kohya}:0.8", "--out", str(tmp_path / "k.png")]) == 0
    assert json.loads(capsys.readouterr().out)["adapters"][0]["strength"] == 0.8
    assert main(["merge", "--base", "mini", "--subject", str(kohya), "--style", str(style), "--method", "direct",
                 "--out", str(tmp_path / "merged")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["subject"]["instance_prompt"] == "sks" and (tmp_path / "merged" / "parts" / "style").exists()
    assert (tmp_path / "k.png").exists()
