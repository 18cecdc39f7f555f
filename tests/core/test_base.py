"""Base models: architecture detection, caching, offline behaviour, refused file kinds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zipq_core import ZipqError, load_base
from zipq_core.base import detect_single_file_arch


def test_mini_is_sdxl_and_cached():
    base = load_base("mini")
    assert base.arch == "sdxl" and base.device.type == "cpu" and base.dtype == torch.float32
    assert load_base("mini") is base
    assert base.default_size == 64


def test_architectures_detected_from_components(tiny_sd1_dir, tiny_sdxl_dir):
    assert load_base(str(tiny_sd1_dir)).arch == "sd1"
    assert load_base(str(tiny_sdxl_dir)).arch == "sdxl"


def test_offline_hub_id_fails_fast_naming_mini(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ZipqError, match="mini"):
        load_base("stabilityai/stable-diffusion-xl-base-1.0")


@pytest.mark.parametrize("spec, match", [("model.ckpt", "only .safetensors"), ("not a thing", "neither"),
                                         ("/no/such/file.safetensors", "does not exist")])
def test_bad_specs_say_what_to_use(spec, match, tmp_path):
    with pytest.raises(ZipqError, match=match):
        load_base(spec)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ZipqError, match="model_index.json"):
        load_base(str(tmp_path))


@pytest.mark.parametrize("key, arch", [("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
                                       ("cond_stage_model.model.ln_final.weight", "sd2"),
                                       ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1")])
def test_single_file_architecture_from_keys(tmp_path, key, arch):
    path = tmp_path / "ckpt.safetensors"
    save_file({key: torch.zeros(1), "model.diffusion_model.out.0.weight": torch.zeros(1)}, str(path))
    assert detect_single_file_arch(path) == arch


def test_lora_file_given_as_base_is_explained(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ZipqError, match="adapter"):
        load_base(str(path))


def test_a_hub_download_takes_the_fp16_variant_after_checking_the_disk(monkeypatch):
    """No network here: the hub's file list and the download are stand-ins; the order and the checks are real."""
    from diffusers import DiffusionPipeline

    import zipq_core.base as base_module

    calls = []

    def from_pretrained(repo, torch_dtype=None, variant=None, local_files_only=False):
        calls.append((variant, local_files_only))
        if local_files_only:
            raise OSError("not in the cache")
        return "pipeline"

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", from_pretrained)
    monkeypatch.setattr(base_module, "download_size", lambda repo, variant: 7_000_000_000)
    assert base_module._load_hub("org/model", torch.float16) == "pipeline"
    assert calls == [("fp16", True), (None, True), ("fp16", False)]

    calls.clear()
    monkeypatch.setattr(base_module, "download_size", lambda repo, variant: 10**16)  # 10 PB
    with pytest.raises(ZipqError, match=r"needs 10000000\.0 GB in .* free some space or point HF_HOME"):
        base_module._load_hub("org/model", torch.float32)
    assert calls == [(None, True)]  # nothing downloaded
