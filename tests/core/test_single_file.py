"""Single-file checkpoints loaded offline: tiny SD1, SD2 (ε and v) and SDXL pipelines written in the original LDM
layout (tests/ldm.py), loaded by `load_base` with HF_HUB_OFFLINE=1 and compared with the pipeline they came from;
the configs read off the published SD1.5 / SD2.1 / SDXL architectures (built on `meta`) equal the published ones."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zipq_core import ZipqError, load_base
from zipq_core.base import ASSETS_DIR
from zipq_core.single_file import SD2_V_PROBE, configs_from_shapes, detect_prediction_type, read_configs, read_shapes

from ldm import ldm_state_dict, write_ldm_checkpoint

TOKENIZER = ASSETS_DIR / "tokenizer"

# The published configs (the hub repos' unet/vae/text_encoder config.json), the values that define the architecture.
SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=SD_DOWN, up_block_types=SD_UP,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True)  # stabilityai/stable-diffusion-2-1 (768 px, v)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
                 cross_attention_dim=2048, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
              norm_num_groups=32, sample_size=512)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPEN_CLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=512)  # SD2's encoder: ViT-H less its last layer
OPEN_CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)
PUBLISHED = {
    "sd15": ("sd1", "epsilon", SD15_UNET, SD_VAE, [CLIP_L]),
    "sd21": ("sd2", "v_prediction", SD21_UNET, dict(SD_VAE, sample_size=768), [OPEN_CLIP_H]),
    "sdxl": ("sdxl", "epsilon", SDXL_UNET, dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
             [CLIP_L, OPEN_CLIP_BIGG]),
}


# --- tiny pipelines that follow each family's conventions (heads of 64 channels, GroupNorm of 32 groups) ----------

def _text_encoder(width: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or width, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)


def _tokenizer(pad: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(f"{TOKENIZER}/vocab.json", f"{TOKENIZER}/merges.txt", pad_token=pad, model_max_length=77)


def _sd(arch: str, v: bool = False):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    if arch == "sd1":  # 8 heads, 1×1-conv projections
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                    attention_head_dim=8)
    else:  # 64 channels per head, linear projections, attention at both levels, upcast for the v model
        unet = UNet2DConditionModel(block_out_channels=(64, 128), layers_per_block=1, sample_size=32,
                                    down_block_types=("CrossAttnDownBlock2D",) * 2,
                                    up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64,
                                    attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=v)
    return StableDiffusionPipeline(unet=unet, vae=_vae(), text_encoder=_text_encoder(64, "quick_gelu" if arch == "sd1"
                                                                                    else "gelu"),
                                   tokenizer=_tokenizer("<|endoftext|>" if arch == "sd1" else "!"),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)  # encoders 64 + 128 wide (different, as CLIP-L and bigG are); pooled projection 96
    unet = UNet2DConditionModel(block_out_channels=(64, 128), layers_per_block=1, sample_size=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
                                transformer_layers_per_block=(1, 2), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=96 + 6 * 8, cross_attention_dim=64 + 128)
    return StableDiffusionXLPipeline(unet=unet, vae=_vae(), text_encoder=_text_encoder(64, "quick_gelu"),
                                     text_encoder_2=_text_encoder(128, "gelu", projection=96),
                                     tokenizer=_tokenizer("<|endoftext|>"), tokenizer_2=_tokenizer("!"),
                                     scheduler=EulerDiscreteScheduler())


def _unet_output(pipe) -> torch.Tensor:
    """The UNet on a fixed input (and the SDXL added conditions)."""
    g = torch.Generator().manual_seed(1)
    cfg = pipe.unet.config
    x = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 8, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                      "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=context, **extra).sample


def _text_outputs(pipe) -> list[torch.Tensor]:
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    outputs = []
    with torch.no_grad():
        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if encoder is not None:
                out = encoder(ids, output_hidden_states=True)
                outputs += [out.hidden_states[-2], out[0]]
    return outputs


FAMILIES = {  # name → (build, arch, sidecar yaml, expected prediction type, default size)
    "sd1": (lambda: _sd("sd1"), "sd1", None, "epsilon", 512),
    "sd2-eps": (lambda: _sd("sd2"), "sd2", "model:\n  params:\n    linear_start: 0.00085\n", "epsilon", 512),
    "sd2-v": (lambda: _sd("sd2", v=True), "sd2", 'model:\n  params:\n    parameterization: "v"\n', "v_prediction",
              768),
    "sdxl": (_sdxl, "sdxl", None, "epsilon", 1024),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_single_file_loads_offline_and_computes_as_the_original(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build, arch, sidecar, prediction, size = FAMILIES[family]
    pipe = build()
    path = write_ldm_checkpoint(pipe, arch, tmp_path / f"{family}.safetensors")
    if sidecar:
        (tmp_path / f"{family}.yaml").write_text(sidecar)

    base = load_base(str(path))

    assert base.arch == arch and type(base.pipe).__name__ == type(pipe).__name__
    assert base.pipe.scheduler.config.prediction_type == prediction
    assert base.default_size == size
    assert base.pipe.unet.config.upcast_attention == (family == "sd2-v")
    # Weights in memory of their own (not views into the file's map at its unaligned offsets, where CPU kernels
    # round otherwise): the same numbers as the pipeline the file was written from, bit for bit.
    assert all(p.data_ptr() % 64 == 0 for p in base.pipe.unet.parameters())
    assert torch.equal(_unet_output(base.pipe), _unet_output(pipe))
    for loaded, original in zip(_text_outputs(base.pipe), _text_outputs(pipe), strict=True):
        assert torch.equal(loaded, original)
    if arch == "sdxl":
        assert base.pipe.tokenizer_2.pad_token == "!" and base.pipe.tokenizer.pad_token == "<|endoftext|>"


def _meta_components(unet_cfg: dict, vae_cfg: dict, text_cfgs: list[dict]):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        encoders = [(CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(CLIPTextConfig(**cfg))
                    for i, cfg in enumerate(text_cfgs)]
    return unet, vae, encoders


def _full_config(cls, cfg: dict) -> dict:
    """A config as the model stores it, every default filled in."""
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_configs_read_off_published_architectures_equal_the_published(name):
    """Full-size SD1.5 / SD2.1 / SDXL on `meta` (no weights) → LDM key shapes → the configs read from them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    arch, prediction, unet_cfg, vae_cfg, text_cfgs = PUBLISHED[name]
    unet, vae, encoders = _meta_components(unet_cfg, vae_cfg, text_cfgs)
    shapes = {k: tuple(v.shape) for k, v in ldm_state_dict(arch, unet, vae, *encoders).items()}

    read = configs_from_shapes(shapes, arch, prediction)

    assert _full_config(UNet2DConditionModel, read.unet) == _full_config(UNet2DConditionModel, unet_cfg)
    assert _full_config(AutoencoderKL, read.vae) == _full_config(AutoencoderKL, vae_cfg)
    assert [{k: cfg[k] for k in published} for cfg, published in
            zip(read.text_encoders.values(), text_cfgs, strict=True)] == text_cfgs
    assert read.scheduler["prediction_type"] == prediction


def _probe_file(path, spread: float):
    """A file holding only the tensor ComfyUI's SD2 test reads, with the given spread."""
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(1280, generator=g)
    save_file({SD2_V_PROBE: bias / bias.std(unbiased=False) * spread}, str(path))
    return path


@pytest.mark.parametrize("spread, expected", [(0.2, "v_prediction"), (0.03, "epsilon")])
def test_sd2_prediction_type_from_the_weights_without_a_yaml(tmp_path, spread, expected):
    path = _probe_file(tmp_path / "sd2.safetensors", spread)
    kind, source = detect_prediction_type(path, read_shapes(path), "sd2")
    assert kind == expected and "ComfyUI" in source


def test_prediction_type_order_option_yaml_key(tmp_path):
    path = _probe_file(tmp_path / "sd2.safetensors", 0.2)  # the weights say v …
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    cond_stage_key: txt\n")  # … the SD2-base yaml says ε
    assert detect_prediction_type(path, read_shapes(path), "sd2") == ("epsilon", "sd2.yaml")
    assert detect_prediction_type(path, read_shapes(path), "sd2", "v")[0] == "v_prediction"
    assert detect_prediction_type(path, {"v_pred": ()}, "sdxl")[0] == "epsilon"  # the yaml still wins
    (tmp_path / "sd2.yaml").unlink()
    assert detect_prediction_type(path, {"v_pred": ()}, "sdxl") == ("v_prediction", "the file's v_pred key")
    with pytest.raises(ZipqError, match="epsilon or v_prediction"):
        detect_prediction_type(path, {}, "sd2", "x0")


def test_sdxl_v_pred_key_gives_a_v_scheduler(tmp_path):
    path = write_ldm_checkpoint(_sdxl(), "sdxl", tmp_path / "vpred.safetensors", extra={"v_pred": torch.zeros(0)})
    config = read_configs(path)
    assert config.prediction_type == "v_prediction" and config.scheduler["prediction_type"] == "v_prediction"


def test_unreadable_files_say_what_they_are(tmp_path):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x00\x10\x00\x00\x00\x00\x00\x00{")  # a header length far past the end
    with pytest.raises(ZipqError, match="truncated download"):
        load_base(str(truncated))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xfe\xfd\xfc")
    with pytest.raises(ZipqError, match="not JSON"):
        load_base(str(garbage))
    no_vae = tmp_path / "no_vae.safetensors"
    state = {k: v for k, v in ldm_state_dict("sd1", *(lambda p: (p.unet, p.vae, p.text_encoder))(_sd("sd1"))).items()
             if not k.startswith("first_stage_model.")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(no_vae))
    with pytest.raises(ZipqError, match="no VAE"):
        load_base(str(no_vae))


def test_a_tokenizer_that_does_not_fit_the_encoder_names_where_to_put_the_right_one(tmp_path, monkeypatch):
    import zipq_core.single_file as single_file

    path = write_ldm_checkpoint(_sd("sd1"), "sd1", tmp_path / "sd1.safetensors")
    small = tmp_path / "small_vocab"
    small.mkdir()
    (small / "vocab.json").write_text('{"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}')
    (small / "merges.txt").write_text("#version: 0.2\n")
    monkeypatch.setattr(single_file, "TOKENIZER_DIR", small)
    with pytest.raises(ZipqError, match=f"has 49408 tokens.*{tmp_path / 'tokenizer'}"):
        single_file.load_single_file(path, torch.float32)


def test_inpainting_and_refiner_checkpoints_are_refused_with_what_to_use(tmp_path):
    arch, prediction, unet_cfg, vae_cfg, text_cfgs = PUBLISHED["sd15"]
    unet, vae, encoders = _meta_components(dict(unet_cfg, in_channels=9), vae_cfg, text_cfgs)
    shapes = {k: tuple(v.shape) for k, v in ldm_state_dict(arch, unet, vae, *encoders).items()}
    with pytest.raises(ZipqError, match="9 input channels.*text-to-image"):
        configs_from_shapes(shapes, arch)
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1),
               "model.diffusion_model.out.2.weight": torch.zeros(1)}, str(refiner))
    with pytest.raises(ZipqError, match="refiner.*SDXL base"):
        load_base(str(refiner))
