"""A test-only writer: a diffusers pipeline's weights under the original LDM/SGM single-file key names.

diffusers only converts the other way (`diffusers/loaders/single_file_utils.py`: `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint` and the
`DIFFUSERS_TO_LDM_MAPPING` table); each function here inverts one of them, so a file it writes is what those
converters read back into the same weights. It works on `meta` tensors too: the shapes of a full-size
architecture without its weights.

LDM layout of the UNet (`model.diffusion_model.`), with L ResBlocks per level:
`input_blocks.0` is conv_in; level b's ResBlocks (and transformers) are `input_blocks.{1 + b(L+1) + i}.0` (`.1`),
its downsampler `input_blocks.{(b+1)(L+1)}.0.op`; `middle_block.0/1/2` = ResBlock, transformer, ResBlock; up level
b's L+1 ResBlocks are `output_blocks.{b(L+1) + i}.0` (transformer `.1`), its upsampler the last module of its last
block (`.2.conv` after a transformer, else `.1.conv`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from zipq_core.single_file import SD1_CLIP, SD2_CLIP, SDXL_CLIP_G, SDXL_CLIP_L, UNET, VAE  # the layout it reads

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}


def _rename(rest: str, table: dict[str, str]) -> str:
    """Replace the module path at the start of `rest` (e.g. `norm1.weight`) by its LDM name."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A `UNet2DConditionModel` state dict → `model.diffusion_model.*` (inverse of `convert_ldm_unet_checkpoint`)."""
    per = config["layers_per_block"] + 1
    up_attention = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, i, r: f"input_blocks.{1 + b * per + i}.0."
                                                                      + _rename(r, _RESNET)),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, i, r: f"input_blocks.{1 + b * per + i}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda b, r: f"input_blocks.{(b + 1) * per}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda i, r: f"middle_block.{2 * i}." + _rename(r, _RESNET)),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, i, r: f"output_blocks.{b * per + i}.0."
                                                                    + _rename(r, _RESNET)),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, i, r: f"output_blocks.{b * per + i}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda b, r: f"output_blocks.{b * per + per - 1}.{2 if up_attention[b] else 1}.conv.{r}"),
    ]
    out = {}
    for key, value in state.items():
        out[UNET + _apply(key, rules, _UNET_FIXED)] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An `AutoencoderKL` state dict → `first_stage_model.*` (inverse of `convert_ldm_vae_checkpoint`)."""
    levels = len(config["up_block_types"])
    shortcut = {"conv_shortcut": "nin_shortcut"}
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"encoder.down.{i}.block.{j}." + _rename(r, shortcut)),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda i, r: f"encoder.down.{i}.downsample.conv.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda part, i, r: f"{part}.mid.block_{int(i) + 1}." + _rename(r, shortcut)),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
         lambda part, r: f"{part}.mid.attn_1." + _rename(r, _VAE_ATTENTION)),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"decoder.up.{levels - 1 - i}.block.{j}." + _rename(r, shortcut)),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, r: f"decoder.up.{levels - 1 - i}.upsample.conv.{r}"),
    ]
    fixed = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    out = {}
    for key, value in state.items():
        name = _apply(key, rules, fixed)
        if ".mid.attn_1." in name and name.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1×1 convolutions
        out[VAE + name] = value
    return out


def _apply(key: str, rules, fixed: dict[str, str]) -> str:
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            groups = [int(g) if g.isdigit() else g for g in match.groups()]
            return build(*groups)
    return _rename(key, fixed)


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A `CLIPTextModel` (OpenAI CLIP-L) → `{prefix}text_model.*` (inverse of `convert_ldm_clip_checkpoint`).
    transformers ≥ 5.6 names the flattened model's keys without `text_model.`; the files always have it."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str, unused_last_layer: bool = False
                     ) -> dict[str, torch.Tensor]:
    """A CLIP text model in diffusers' layout → OpenCLIP's (`{prefix}transformer.resblocks.*`; inverse of
    `convert_open_clip_checkpoint`: q, k, v fused into `in_proj`, `text_projection` stored transposed).

    Args:
        state: the text model's state dict.
        prefix: `cond_stage_model.model.` (SD2) or `conditioner.embedders.1.model.` (SDXL).
        unused_last_layer: write one more block and a `text_projection`, as SD2 files carry them (SD2 conditions
            on the penultimate layer's output, so diffusers' SD2 encoder has neither).

    Returns:
        The LDM state dict.
    """
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias")}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()  # [width, projection]
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for n in layers:
        block = f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"encoder.layers.{n}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
        for key in [k for k in state if k.startswith(f"encoder.layers.{n}.")]:
            out[block + _rename(key.removeprefix(f"encoder.layers.{n}."), _CLIP_LAYER)] = state.pop(key)
    assert not state, f"unmapped text-encoder keys: {sorted(state)}"
    if unused_last_layer:
        last, extra = f"{prefix}transformer.resblocks.{layers[-1]}.", f"{prefix}transformer.resblocks.{len(layers)}."
        out.update({extra + k[len(last):]: v.clone() for k, v in out.items() if k.startswith(last)})
        width = out[prefix + "ln_final.weight"].shape[0]
        out[prefix + "text_projection"] = torch.eye(width, device=out[prefix + "ln_final.weight"].device)
    return out


def ldm_state_dict(arch: str, unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """A whole single-file checkpoint's tensors for the given components.

    Args:
        arch: "sd1", "sd2" or "sdxl" (where the text encoders go and in which layout).
        unet, vae, text_encoder, text_encoder_2: the diffusers/transformers modules (real or on `meta`).

    Returns:
        LDM/SGM key → tensor.
    """
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    if arch == "sd1":
        out.update(clip_to_ldm(text_encoder.state_dict(), SD1_CLIP))
    elif arch == "sd2":
        out.update(open_clip_to_ldm(text_encoder.state_dict(), SD2_CLIP, unused_last_layer=True))
    else:
        out.update(clip_to_ldm(text_encoder.state_dict(), SDXL_CLIP_L))
        out.update(open_clip_to_ldm(text_encoder_2.state_dict(), SDXL_CLIP_G))
    return out


def write_ldm_checkpoint(pipe, arch: str, path: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a pipeline as one original-format `.safetensors` file (as A1111/ComfyUI/civitai share them).

    Args:
        pipe: a StableDiffusion(XL)Pipeline.
        arch: its family.
        path: the file to write.
        extra: more tensors to store (e.g. SDXL v-prediction fine-tunes' empty `v_pred` marker).

    Returns:
        `path`.
    """
    state = ldm_state_dict(arch, pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    state.update(extra or {})
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    return Path(path)
