"""Shared fixtures: tiny pipelines built from configs (SD1.5 and SDXL architectures), example image sets.

As in diffusers' own tests, every component is seeded before it is built so runs are reproducible;
the pipelines are saved once per session and loaded through the same `load_base` users call.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
TOKENIZER = ROOT / "assets" / "tokenizer"


def _tokenizer(pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), pad_token=pad,
                         model_max_length=77)


def _text_encoder(width: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=16, sample_size=64)


def build_tiny_sd1():
    """An SD1.5-architecture pipeline (one text encoder, 32-px latents' worth of UNet) from configs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32, attention_head_dim=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(unet=unet, vae=_vae(), text_encoder=_text_encoder(32), tokenizer=_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_sdxl():
    """An SDXL-architecture pipeline (two text encoders, text_time conditions) from configs."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                                norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(unet=unet, vae=_vae(), text_encoder=_text_encoder(32),
                                     text_encoder_2=_text_encoder(32, projection=True), tokenizer=_tokenizer(),
                                     tokenizer_2=_tokenizer(pad="!"), scheduler=scheduler)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_sd1")
    build_tiny_sd1().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mini():
    """The bundled mini base model, loaded once for the whole run (`load_base` caches it)."""
    from zipq_core import load_base

    return load_base("mini")


@pytest.fixture(scope="session")
def subject_dir() -> Path:
    folders = sorted(p for p in (EXAMPLES / "subjects").iterdir() if p.is_dir())
    assert folders, "assets/examples/subjects is empty"
    return folders[0]


@pytest.fixture(scope="session")
def style_dir() -> Path:
    folders = sorted(p for p in (EXAMPLES / "styles").iterdir() if p.is_dir())
    assert folders, "assets/examples/styles is empty"
    return folders[0]


@pytest.fixture(scope="module")
def launched_app(tmp_path_factory):
    """The Studio on mini with the default limits, one per test module: (url, studio)."""
    url, demo, studio = launch(tmp_path_factory.mktemp("sessions"))
    yield url, studio
    demo.close()
    studio.registry.close()
