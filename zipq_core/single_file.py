"""Single-file checkpoints (original LDM/SGM key names) loaded offline: SD1.x, SD2.x (ε and v) and SDXL base.

diffusers' `from_single_file` converts the weights but takes each component's configuration from the hub repo it
guesses for the file — impossible offline. Here the configurations are read off the tensor shapes in the file's
safetensors header (no weight is loaded), filled in with each family's published conventions where shapes are
silent (attention heads, activations, scaling factors), written to a temporary folder and handed to
`from_single_file(path, config=folder, local_files_only=True)`, which then reads every config from that folder.

What shapes cannot tell, and where it comes from instead:
- attention heads: SD1 has 8 heads per UNet transformer; SD2 and SDXL 64 channels per head; CLIP text encoders
  64 channels per head (12, 16, 20 heads for the 768, 1024, 1280 wide encoders);
- the prediction type (ε or v): an explicit option, else a sidecar `<file>.yaml` beside the checkpoint (the
  LDM config Stability ships with SD2: `parameterization: "v"`; an SGM config's `VScaling`), else a `v_pred` key
  in the file (SDXL v-prediction fine-tunes, as ComfyUI reads it), else for SD2 ComfyUI's weight heuristic
  (`comfy/supported_models.py`, `SD20.model_type`: the std of one norm bias is above 0.09 in v models; v, as
  diffusers assumes, for an SD2 file without that tensor), else ε;
- SD2 v models are the 768 px ones, computed with attention upcast to fp32 (as diffusers' converter and the
  published stable-diffusion-2-1 config do); SD2 ε models are 512 px;
- the tokenizer: every family uses CLIP's BPE vocabulary, bundled in `assets/tokenizer`; a `tokenizer/`
  (`tokenizer_2/`) folder beside the checkpoint wins over it.
"""

from __future__ import annotations

import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Arch
from .errors import ZipqError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_CLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_CLIP_G = "conditioner.embedders.1.model."
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"  # the bundled CLIP vocabulary

PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                    "v-prediction": "v_prediction"}
IMAGE_SIZE = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
# ComfyUI's SD2 v-prediction test: this bias's spread is above 0.09 in the v models, below in the ε ones
SD2_V_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_PROBE_STD = 0.09
_MAX_HEADER = 100_000_000  # a safetensors header is JSON: a few hundred kB even for SDXL

Shapes = dict[str, tuple[int, ...]]


@dataclass
class SingleFileConfig:
    """What a checkpoint's header says about its pipeline: the diffusers configs of each component."""

    arch: Arch
    prediction_type: str  # "epsilon" | "v_prediction"
    prediction_source: str  # where the prediction type was read: the option, the .yaml, a key, a heuristic
    unet: dict
    vae: dict
    text_encoders: dict[str, dict] = field(default_factory=dict)  # "text_encoder"(_2) → CLIPTextConfig kwargs
    scheduler: dict = field(default_factory=dict)  # with "_class_name"

    @property
    def pipeline_class(self) -> str:
        return "StableDiffusionXLPipeline" if self.arch == "sdxl" else "StableDiffusionPipeline"


# --- reading the header ------------------------------------------------------------------------------------------

def read_shapes(path: Path) -> Shapes:
    """Every tensor's shape from a safetensors file's header (8-byte little-endian length, then JSON); no data read.

    Args:
        path: a `.safetensors` file.

    Returns:
        Key → shape.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > min(size - 8, _MAX_HEADER):
            raise ZipqError(f"{path.name} is not a readable safetensors file ({size} bytes, its header length does "
                            "not fit): a truncated download? Download it again, or use a diffusers folder.")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ZipqError(f"{path.name} is not a readable safetensors file (its header is not JSON: {e}): a "
                            "truncated or corrupted download? Download it again.") from e
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def arch_from_keys(name: str, keys) -> Arch:
    """The architecture of an original-format checkpoint from its key names.

    Args:
        name: the file's name (for messages).
        keys: its tensor names.

    Returns:
        "sd1", "sd2" or "sdxl".
    """
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith(SD2_CLIP) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_CLIP) for k in keys):
        return "sd1"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ZipqError(f"{name} is an SDXL refiner (or an SD2 saved in SGM layout: one OpenCLIP text encoder under "
                        "conditioner.embedders.0): use an SDXL base checkpoint, or SD2 in its original layout.")
    if any(k.startswith(UNET) for k in keys):
        raise ZipqError(f"{name}: a UNet checkpoint without its text encoder; use a full checkpoint "
                        "or a diffusers folder.")
    raise ZipqError(f"{name} is not a Stable Diffusion checkpoint (no UNet/text-encoder keys found). "
                    "Is it a LoRA? Load it as an adapter instead.")


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """The numbers n of the children `prefix{n}.…` (sorted)."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _sub(shapes: Shapes, prefix: str) -> Shapes:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


# --- the configs -------------------------------------------------------------------------------------------------

def unet_config(shapes: Shapes, arch: Arch, image_size: int, vae_factor: int, upcast_attention: bool = False,
                pooled_dim: int | None = None) -> dict:
    """The `UNet2DConditionModel` config of an LDM UNet (`model.diffusion_model.*`) from its shapes.

    Args:
        shapes: the checkpoint's key → shape.
        arch: its family (sets the attention-head convention).
        image_size: the resolution it was trained at, in pixels.
        vae_factor: the VAE's downscaling (8 for every real family).
        upcast_attention: compute attention in fp32 (SD2 768 px v models).
        pooled_dim: SDXL only: the pooled text embedding's width (the second encoder's projection).

    Returns:
        The config dict, `_class_name` included.
    """
    u = _sub(shapes, UNET)
    in_channels = u["input_blocks.0.0.weight"][1]
    if in_channels != 4:
        raise ZipqError(f"its UNet takes {in_channels} input channels (an inpainting or instruct-pix2pix model): only "
                        "text-to-image checkpoints (4 latent channels) can be trained here.")
    ops = [i for i in _indices(u, "input_blocks.") if f"input_blocks.{i}.0.op.weight" in u]  # the downsamplers
    if not ops:
        raise ZipqError("the UNet has no downsampling blocks: not an SD1/SD2/SDXL layout.")
    per_level = ops[0] - 1  # input block 0 is conv_in; each level is `per_level` ResBlocks, then a downsampler
    levels = len(ops) + 1
    firsts = [1 + j * (per_level + 1) for j in range(levels)]
    channels = [u[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in firsts]
    depths = [len(_indices(u, f"input_blocks.{i}.1.transformer_blocks.")) for i in firsts]
    up_depths = [len(_indices(u, f"output_blocks.{j * (per_level + 1)}.1.transformer_blocks."))
                 for j in range(levels)]
    cross_key = next((k for k in u if k.endswith("attn2.to_k.weight")), None)
    proj_key = next((k for k in u if k.endswith(".proj_in.weight")), None)
    if cross_key is None or proj_key is None:
        raise ZipqError("the UNet has no cross-attention: not a text-to-image SD1/SD2/SDXL checkpoint.")
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": image_size // vae_factor,
        "in_channels": in_channels,
        "out_channels": u["out.2.weight"][0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "cross_attention_dim": u[cross_key][1],  # attn2.to_k: [inner, context width]
        # SD1: 8 heads (diffusers calls the head count `attention_head_dim`); SD2/SDXL: 64 channels per head
        "attention_head_dim": 8 if arch == "sd1" else [c // 64 for c in channels],
        "use_linear_projection": len(u[proj_key]) == 2,  # SD2/SDXL: Linear [c, c]; SD1: 1×1 conv [c, c, 1, 1]
        "upcast_attention": upcast_attention,
        "norm_num_groups": 32,
    }
    if any(d > 1 for d in depths):  # SDXL: 1, 2, 10 transformers per level (a level without attention counts 1)
        config["transformer_layers_per_block"] = [max(d, 1) for d in depths]
    if "label_emb.0.0.weight" in u:  # SDXL's added conditions: pooled text + 6 Fourier-embedded size/crop numbers
        adm_in = u["label_emb.0.0.weight"][1]
        if pooled_dim is None or (adm_in - pooled_dim) % 6:
            raise ZipqError(f"the UNet's added-condition input ({adm_in}) does not match SDXL's pooled text "
                            f"embedding ({pooled_dim}) plus 6 time ids.")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - pooled_dim) // 6,
                      projection_class_embeddings_input_dim=adm_in)
    return config


def vae_config(shapes: Shapes, arch: Arch, image_size: int) -> dict:
    """The `AutoencoderKL` config of an LDM VAE (`first_stage_model.*`) from its shapes.

    Args:
        shapes: the checkpoint's key → shape.
        arch: its family (sets the latent scaling factor).
        image_size: the resolution it was trained at, in pixels.

    Returns:
        The config dict, `_class_name` included.
    """
    v = _sub(shapes, VAE)
    if not v:
        raise ZipqError("the checkpoint has no VAE (`first_stage_model.*`): use a full checkpoint or a diffusers "
                        "folder.")
    levels = len(_indices(v, "encoder.down."))
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": v["encoder.conv_in.weight"][1],
        "out_channels": v["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [v[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        "layers_per_block": len(_indices(v, "encoder.down.0.block.")),
        "latent_channels": v["post_quant_conv.weight"][0],
        "norm_num_groups": 32,
        "sample_size": image_size,
        "scaling_factor": VAE_SCALING[arch],
        "force_upcast": True,
    }


def _clip_text(vocab: int, hidden: int, positions: int, layers: int, inner: int, act: str, projection: int,
               with_projection: bool) -> dict:
    """CLIPTextConfig kwargs; special-token ids as the published SD/SDXL configs have them (transformers then pools
    at the highest token id, the end token)."""
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inner, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "max_position_embeddings": positions, "hidden_act": act,
            "projection_dim": projection, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1}


def clip_config(shapes: Shapes, prefix: str, projection: int) -> dict:
    """An OpenAI CLIP-L text encoder in transformers' layout (`…text_model.*`: SD1, SDXL's first encoder).

    Args:
        shapes: the checkpoint's key → shape.
        prefix: where the encoder's keys start (`cond_stage_model.transformer.`).
        projection: the published projection width (unused by `CLIPTextModel`, kept for equal configs).

    Returns:
        CLIPTextConfig kwargs.
    """
    t = _sub(shapes, prefix + "text_model.")
    if not t:
        raise ZipqError(f"its text encoder keys do not start with {prefix}text_model. (an old layout): convert "
                        "the file to a diffusers folder with a tool that knows it, or re-save it in ComfyUI.")
    vocab, hidden = t["embeddings.token_embedding.weight"]
    return _clip_text(vocab, hidden, t["embeddings.position_embedding.weight"][0], len(_indices(t, "encoder.layers.")),
                      t["encoder.layers.0.mlp.fc1.weight"][0], "quick_gelu", projection, with_projection=False)


def open_clip_config(shapes: Shapes, prefix: str, drop_last: bool, with_projection: bool,
                     projection: int | None = None) -> dict:
    """An OpenCLIP text encoder (`…model.transformer.resblocks.*`: SD2's ViT-H, SDXL's bigG) in diffusers' layout.

    Args:
        shapes: the checkpoint's key → shape.
        prefix: where the encoder's keys start.
        drop_last: SD2 conditions on the penultimate layer, so diffusers' SD2 encoder has one layer fewer than
            the file (its converter drops the last one).
        with_projection: SDXL's second encoder also gives the projected pooled embedding.
        projection: the projection width; None reads it off `text_projection` ([width, projection]).

    Returns:
        CLIPTextConfig kwargs.
    """
    t = _sub(shapes, prefix)
    vocab, hidden = t["token_embedding.weight"]
    layers = len(_indices(t, "transformer.resblocks.")) - int(drop_last)
    inner = t["transformer.resblocks.0.mlp.c_fc.weight"][0]
    return _clip_text(vocab, hidden, t["positional_embedding"][0], layers, inner, "gelu",
                      projection or t["text_projection"][1], with_projection)


def scheduler_config(arch: Arch, prediction_type: str, zero_snr: bool = False) -> dict:
    """The noise schedule every SD family was trained with; DDIM for SD1/SD2 (as diffusers' single-file converter
    builds it), Euler for SDXL (as its published pipeline ships).

    Args:
        arch: the family.
        prediction_type: "epsilon" or "v_prediction".
        zero_snr: the file says it was trained with zero terminal SNR (an SDXL v-prediction fine-tune's `ztsnr`).

    Returns:
        The config dict, `_class_name` included.
    """
    common = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "prediction_type": prediction_type, "steps_offset": 1}
    if arch == "sdxl":
        return {"_class_name": "EulerDiscreteScheduler", **common, "interpolation_type": "linear",
                "timestep_spacing": "trailing" if zero_snr else "leading", "rescale_betas_zero_snr": zero_snr}
    return {"_class_name": "DDIMScheduler", **common, "clip_sample": False, "set_alpha_to_one": False}


def configs_from_shapes(shapes: Shapes, arch: Arch, prediction_type: str = "epsilon",
                        prediction_source: str = "given") -> SingleFileConfig:
    """Every component's config for a checkpoint whose shapes and prediction type are known.

    Args:
        shapes: the checkpoint's key → shape.
        arch: its family (`arch_from_keys`).
        prediction_type: "epsilon" or "v_prediction".
        prediction_source: where the prediction type came from (kept for messages).

    Returns:
        The configs.
    """
    v_model = prediction_type == "v_prediction"
    size = IMAGE_SIZE["sd2-v" if arch == "sd2" and v_model else arch]
    vae = vae_config(shapes, arch, size)
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if arch == "sd1":
        encoders = {"text_encoder": clip_config(shapes, SD1_CLIP, projection=768)}
    elif arch == "sd2":
        encoders = {"text_encoder": open_clip_config(shapes, SD2_CLIP, drop_last=True, with_projection=False,
                                                     projection=512)}
    else:
        encoders = {"text_encoder": clip_config(shapes, SDXL_CLIP_L, projection=768),
                    "text_encoder_2": open_clip_config(shapes, SDXL_CLIP_G, drop_last=False, with_projection=True)}
    pooled = encoders.get("text_encoder_2", {}).get("projection_dim")
    unet = unet_config(shapes, arch, size, factor, upcast_attention=arch == "sd2" and v_model, pooled_dim=pooled)
    return SingleFileConfig(arch=arch, prediction_type=prediction_type, prediction_source=prediction_source,
                            unet=unet, vae=vae, text_encoders=encoders,
                            scheduler=scheduler_config(arch, prediction_type, zero_snr="ztsnr" in shapes))


# --- the prediction type -----------------------------------------------------------------------------------------

def _from_yaml(path: Path) -> str:
    """ε or v from an LDM config (`model.params.parameterization`) or an SGM one (a `VScaling` denoiser)."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ZipqError(f"{path.name} beside the checkpoint is not a readable YAML config ({e}): fix it or remove "
                        "it.") from e
    params = ((config or {}).get("model") or {}).get("params") or {}
    if params.get("parameterization") == "v" or "VScaling" in json.dumps(params):
        return "v_prediction"
    return "epsilon"  # SD1's v1-inference.yaml and SD2-base's v2-inference.yaml name no parameterization


def detect_prediction_type(path: Path, shapes: Shapes, arch: Arch, explicit: str | None = None) -> tuple[str, str]:
    """Whether the checkpoint predicts the noise (ε) or the velocity (v), and from what that was read.

    Args:
        path: the checkpoint.
        shapes: its key → shape.
        arch: its family.
        explicit: "epsilon" / "eps" / "v" / "v_prediction" to override everything.

    Returns:
        ("epsilon" | "v_prediction", where it was read).
    """
    if explicit:
        if explicit not in PREDICTION_TYPES:
            raise ZipqError(f"prediction type {explicit!r} is unknown: use epsilon or v_prediction.")
        return PREDICTION_TYPES[explicit], "the option"
    sidecar = Path(path).with_suffix(".yaml")
    if sidecar.is_file():
        return _from_yaml(sidecar), sidecar.name
    if "v_pred" in shapes:
        return "v_prediction", "the file's v_pred key"
    if arch != "sd2":
        return "epsilon", "the default"
    if SD2_V_PROBE not in shapes:  # an unusual SD2 layout: diffusers' own default (the 768 px v model is common)
        return "v_prediction", "the SD2 default"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        spread = f.get_tensor(SD2_V_PROBE).float().std(unbiased=False).item()
    return ("v_prediction" if spread > SD2_V_PROBE_STD else "epsilon"), f"ComfyUI's SD2 test (std {spread:.3f})"


def read_configs(path: Path, prediction_type: str | None = None) -> SingleFileConfig:
    """Every component's config for a single-file checkpoint, read from its header (and its `.yaml` if any).

    Args:
        path: the `.safetensors` checkpoint.
        prediction_type: None to detect it (`detect_prediction_type`), else "epsilon" or "v_prediction".

    Returns:
        The configs.
    """
    path = Path(path)
    shapes = read_shapes(path)
    arch = arch_from_keys(path.name, shapes)
    kind, source = detect_prediction_type(path, shapes, arch, prediction_type)
    try:
        return configs_from_shapes(shapes, arch, kind, source)
    except KeyError as e:
        raise ZipqError(f"{path.name} looks like {arch} but has no {e.args[0]!r}: not a standard {arch} layout. "
                        "Convert it to a diffusers folder (with the model's own config) and load that.") from e
    except ZipqError as e:
        raise ZipqError(f"{path.name} ({arch}): {e}") from e


# --- the pipeline ------------------------------------------------------------------------------------------------

def _tokenizer(path: Path, name: str, pad: str, vocab_size: int):
    """The tokenizer for one text encoder: a `tokenizer/` (`tokenizer_2/`) folder beside the checkpoint (a diffusers
    folder's), else the bundled CLIP vocabulary; its size must be the encoder's."""
    from transformers import CLIPTokenizer

    beside = path.parent / name
    if (beside / "vocab.json").is_file() or (beside / "tokenizer.json").is_file():
        tokenizer, source = CLIPTokenizer.from_pretrained(str(beside), local_files_only=True), beside
    elif (TOKENIZER_DIR / "vocab.json").is_file() and (TOKENIZER_DIR / "merges.txt").is_file():
        tokenizer = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), pad_token=pad,
                                  model_max_length=77)
        source = TOKENIZER_DIR
    else:
        raise ZipqError(f"No tokenizer for {path.name}: put its tokenizer files (vocab.json and merges.txt) in "
                        f"{beside}/ (the bundled CLIP vocabulary at {TOKENIZER_DIR} is missing too).")
    if len(tokenizer) != vocab_size:
        raise ZipqError(f"{path.name}'s text encoder has {vocab_size} tokens but the tokenizer in {source} has "
                        f"{len(tokenizer)}: put the checkpoint's own tokenizer files (vocab.json and merges.txt) in "
                        f"{beside}/.")
    return tokenizer


def write_config_folder(folder: Path, config: SingleFileConfig) -> Path:
    """A diffusers pipeline folder holding only configs (`model_index.json`, `unet/config.json`, …).

    Args:
        folder: an existing, empty folder.
        config: the configs.

    Returns:
        `folder`.
    """
    import diffusers
    from transformers import CLIPTextConfig

    index = {"_class_name": config.pipeline_class, "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", config.scheduler["_class_name"]],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if config.arch == "sdxl":
        index.update(force_zeros_for_empty_prompt=True, tokenizer_2=["transformers", "CLIPTokenizer"])
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    for name, kwargs in config.text_encoders.items():
        index[name] = ["transformers", kwargs["architectures"][0]]
        CLIPTextConfig(**kwargs).save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    for name, cfg in (("unet", config.unet), ("vae", config.vae)):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config.scheduler, indent=2))
    return folder


def load_single_file(path: Path, dtype: torch.dtype, prediction_type: str | None = None):
    """Load a single-file SD1.x / SD2.x / SDXL checkpoint with no network access.

    Args:
        path: the `.safetensors` checkpoint (original LDM/SGM key names, as A1111, ComfyUI and civitai use).
        dtype: the weights' dtype.
        prediction_type: None to detect it (see the module docstring), else "epsilon" or "v_prediction".

    Returns:
        A `StableDiffusionPipeline` or `StableDiffusionXLPipeline`.
    """
    import diffusers

    path = Path(path)
    config = read_configs(path, prediction_type)
    pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[config.arch]  # as published
    tokenizers = {}
    for (name, cfg), pad in zip(config.text_encoders.items(), pads, strict=True):
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        tokenizers[tokenizer_name] = _tokenizer(path, tokenizer_name, pad, cfg["vocab_size"])
    cls = getattr(diffusers, config.pipeline_class)
    with tempfile.TemporaryDirectory(prefix="zipq-single-file-") as folder:
        write_config_folder(Path(folder), config)
        try:
            pipe = cls.from_single_file(str(path), config=folder, local_files_only=True, torch_dtype=dtype,
                                        **tokenizers)
        except Exception as e:  # the weights disagree with the configs read from their own shapes
            raise ZipqError(f"Could not load {path.name} as {config.arch} ({config.prediction_type}, from "
                            f"{config.prediction_source}): {type(e).__name__}: {e}. Its layout differs from the "
                            "standard one; convert it to a diffusers folder with its own config and load that.") from e
    return in_own_memory(pipe)


def in_own_memory(pipe):
    """The pipeline with every CPU weight copied out of the checkpoint's memory map.

    Weights loaded in the file's own dtype are views into the mapped file at the file's offsets, which safetensors
    aligns only to the element size. CPU kernels take other paths on such addresses and round differently, so the
    same weights loaded from a diffusers folder gave other images (1e-6 apart in the UNet's output on an AMD EPYC),
    and the process kept the file open. A copy per tensor costs no extra peak: the map's pages are the file's.
    """
    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in [*component.parameters(), *component.buffers()]:
                    if tensor.device.type == "cpu":
                        tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return pipe
