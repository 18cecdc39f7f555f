"""The bundled ``mini`` base model: an SDXL-architecture pipeline small enough to train and run on a CPU.

Every component is the real diffusers / transformers class that SDXL uses (two CLIP text encoders, a
``UNet2DConditionModel`` with the ``text_time`` added conditions, an ``AutoencoderKL``, an Euler scheduler),
only narrow and shallow. So code written against ``mini`` (LoRA/DoRA targets, B-LoRA block names, the
pipeline's call signature, save/load) runs unchanged on SDXL itself.

Why these shapes (DESIGN.md section 9):
- The VAE downsamples 4x (three blocks) to a 16x16 latent, but with 8 latent channels instead of SDXL's 4:
  reconstructions of textures and colours get far easier, while the UNet's cost grows only in its first
  and last convolution. Its widths (16, 32, 64) are narrow because its full-resolution convolutions dominate
  the training cost on a CPU (fwd+bwd, batch 16, one core: 0.27 s vs 0.75 s for (32, 64, 96)).
- The UNet has three levels (16, 8, 4 px) with cross attention at 8 and 4 px, like SDXL's
  ``DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D``; ``up_blocks.0.attentions.{0,1}`` exist, so
  B-LoRA's content/style blocks have the same names as on SDXL.
- The text encoders keep the real 49,408-token CLIP vocabulary (the tokenizer files in ``assets/tokenizer``)
  and 77 positions, so every SDXL prompt tokenizes identically; their width is 64 and depth 3.

Nothing here does work at import time; ``build_mini_pipeline`` builds a randomly initialised pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from zipq_core.base import ASSETS_DIR, MINI_DIR

TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

# Ids of the real CLIP BPE vocabulary (identical to SD / SDXL's tokenizer).
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408


@dataclass
class MiniConfig:
    """Sizes of the mini pipeline. The defaults are what ``assets/mini`` ships."""

    resolution: int = field(default=64, metadata={"help": "Image side in pixels."})
    latent_channels: int = field(default=8, metadata={"help": "VAE latent channels (SDXL: 4)."})
    vae_channels: tuple[int, ...] = field(
        default=(16, 32, 64), metadata={"help": "VAE block widths; len-1 = number of 2x downsamplings."}
    )
    vae_groups: int = field(default=16, metadata={"help": "GroupNorm groups in the VAE (must divide its widths)."})
    vae_layers_per_block: int = 1
    unet_channels: tuple[int, ...] = field(default=(32, 64, 128), metadata={"help": "UNet block widths."})
    unet_layers_per_block: int = 1
    head_dim: int = field(default=32, metadata={"help": "Attention head width (heads = channels / head_dim)."})
    text_width: int = field(default=64, metadata={"help": "Hidden size of each CLIP text encoder."})
    text_layers: int = 3
    text_heads: int = 2
    projection_dim: int = field(default=64, metadata={"help": "Pooled embedding width of text encoder 2."})
    time_embed_dim: int = field(default=16, metadata={"help": "SDXL addition_time_embed_dim (6 ids each)."})
    max_length: int = field(default=77, metadata={"help": "Token positions (CLIP: 77)."})
    train_timesteps: int = 1000

    def __post_init__(self) -> None:
        down = len(self.vae_channels) - 1
        if self.resolution % (2**down * 2 ** (len(self.unet_channels) - 1)):
            raise ValueError(
                f"resolution {self.resolution} must be divisible by the VAE and UNet downsampling; "
                "pick a multiple of 16."
            )
        if any(c % self.head_dim for c in self.unet_channels[1:]):
            raise ValueError(f"unet_channels {self.unet_channels} must be multiples of head_dim {self.head_dim}.")

    @property
    def latent_size(self) -> int:
        """Side of the latent grid (resolution / VAE downsampling)."""
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def text_encoder_config(cfg: MiniConfig, with_projection: bool):
    """The ``CLIPTextConfig`` for one of the two encoders.

    Args:
        cfg: Mini sizes.
        with_projection: True for SDXL's second encoder (``CLIPTextModelWithProjection``).

    Returns:
        A ``transformers.CLIPTextConfig``.
    """
    from transformers import CLIPTextConfig

    # eos_token_id = the real "<|endoftext|>" id: the pooled output is taken at the first EOS token,
    # which is right for both tokenizers (the second pads with "!" = id 0, the first with EOS).
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_width * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act="gelu",
        projection_dim=cfg.projection_dim if with_projection else cfg.text_width,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID if not with_projection else 0,
    )


def unet_config(cfg: MiniConfig) -> dict:
    """Keyword arguments of ``UNet2DConditionModel`` for mini (SDXL layout, small widths)."""
    n = len(cfg.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    # diffusers' "attention_head_dim" is the number of heads (legacy naming), per block.
    heads = tuple(max(1, c // cfg.head_dim) for c in cfg.unet_channels)
    return dict(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        transformer_layers_per_block=1,
        attention_head_dim=heads,
        use_linear_projection=True,
        cross_attention_dim=2 * cfg.text_width,  # the two encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.time_embed_dim,
        # pooled text embedding (projection_dim) + 6 time ids (size, crop, target) of time_embed_dim each
        projection_class_embeddings_input_dim=cfg.projection_dim + 6 * cfg.time_embed_dim,
        norm_num_groups=32,
    )


def vae_config(cfg: MiniConfig) -> dict:
    """Keyword arguments of ``AutoencoderKL`` for mini."""
    n = len(cfg.vae_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_groups,
        sample_size=cfg.resolution,
        scaling_factor=1.0,  # set from the latents' std after the VAE is trained
        force_upcast=True,
    )


def scheduler_config(cfg: MiniConfig) -> dict:
    """Keyword arguments of ``EulerDiscreteScheduler`` (SDXL's noise schedule and defaults)."""
    return dict(
        num_train_timesteps=cfg.train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def load_tokenizers(tokenizer_dir: Path | str = TOKENIZER_DIR, max_length: int = 77):
    """The two SDXL tokenizers from the shipped CLIP BPE files.

    Args:
        tokenizer_dir: Folder with ``vocab.json`` and ``merges.txt``.
        max_length: Padded length (CLIP: 77).

    Returns:
        ``(tokenizer, tokenizer_2)``: the second pads with "!" (id 0) like SDXL's.
    """
    from transformers import CLIPTokenizer

    d = str(tokenizer_dir)
    tok = CLIPTokenizer.from_pretrained(d, model_max_length=max_length, local_files_only=True)
    tok_2 = CLIPTokenizer.from_pretrained(d, model_max_length=max_length, pad_token="!", local_files_only=True)
    return tok, tok_2


def build_mini_pipeline(seed: int = 0, cfg: MiniConfig | None = None):
    """A randomly initialised mini ``StableDiffusionXLPipeline`` (fp32, CPU).

    Args:
        seed: Seeds every component's initialisation (``torch.manual_seed`` before each, as diffusers'
            tests do), so the same seed gives the same weights.
        cfg: Sizes; ``MiniConfig()`` when None.

    Returns:
        A ``StableDiffusionXLPipeline`` with ``force_zeros_for_empty_prompt=True`` and no watermarker.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = cfg or MiniConfig()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(cfg))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config(cfg))
    torch.manual_seed(seed + 2)
    te1 = CLIPTextModel(text_encoder_config(cfg, with_projection=False))
    torch.manual_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(text_encoder_config(cfg, with_projection=True))
    tok1, tok2 = load_tokenizers(max_length=cfg.max_length)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**scheduler_config(cfg)),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_mini(pipe, out_dir: Path | str = MINI_DIR, fp16: bool = True) -> Path:
    """Save a pipeline as a diffusers folder with safetensors weights (fp16 by default, to stay small).

    Args:
        pipe: A ``StableDiffusionXLPipeline``; it is not modified (weights are cast on a copy).
        out_dir: Target folder.
        fp16: Store weights as float16.

    Returns:
        The folder.
    """
    import copy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = copy.deepcopy(pipe)
    if fp16:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            getattr(p, name).to(torch.float16)
    p.save_pretrained(out, safe_serialization=True)
    _declare_float32_text_encoders(out)
    return out


def _declare_float32_text_encoders(out: Path) -> None:
    """Make a plain `DiffusionPipeline.from_pretrained(out)` load every component in fp32.

    transformers 5 loads a model in the dtype its config.json declares, diffusers models in fp32: with
    fp16 text encoders next to an fp32 UNet the pipeline fails ("mat1 and mat2 must have the same dtype").
    The weights stay fp16 on disk (size); only the declared dtype changes.
    """
    import json

    for name in ("text_encoder", "text_encoder_2"):
        path = out / name / "config.json"
        config = json.loads(path.read_text())
        config["dtype"] = "float32"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_mini(path: Path | str = MINI_DIR, dtype: torch.dtype = torch.float32):
    """Load the shipped mini pipeline offline (weights cast to ``dtype``; fp32 on CPU).

    Args:
        path: The diffusers folder.
        dtype: Compute dtype.

    Returns:
        A ``StableDiffusionXLPipeline``.
    """
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def folder_size_mb(path: Path | str) -> float:
    """Total size of the files under ``path`` in MB (1e6 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
