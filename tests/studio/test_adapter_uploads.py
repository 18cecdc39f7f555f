"""'Use an existing LoRA': a visitor's own adapter file becomes the session's subject or style adapter (kohya and
diffusers files, a peft folder's config honoured), then merge and generate read it like a trained one; refusals
(wrong kind of file, too large, made for another model, over the session quota) are messages and change nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from studio.flow import GenerateForm, MergeForm, Studio
from studio.sessions import Quota
from zipq_core import plan
from zipq_core.adapters import fuse_weight, load_adapter, save_adapter
from zipq_core.adapters.kohya import export_kohya
from zipq_core.errors import ZipqError
from zipq_core.jobs import JobRegistry

from helpers import adapter_for


@pytest.fixture
def studio(mini, tmp_path):
    registry = JobRegistry(root=tmp_path / "sessions")
    yield Studio(mini, registry, budget_s=600.0, quota=Quota(session_bytes=8 * 2**20),
                 speed=plan.Speed(flops_per_second=2e10), max_adapter_bytes=2 * 2**20)
    registry.close()


def fused(adapter, base) -> dict[str, torch.Tensor]:
    weights = dict(base.unet.named_modules())
    return {k: fuse_weight(weights[k.removeprefix("unet.")].weight.float(), [(layer, 1.0)])
            for k, layer in adapter.layers.items()}


def assert_same_weights(a, b, base, tol: float = 1e-3) -> None:
    fa, fb = fused(a, base), fused(b, base)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.allclose(fa[k], fb[k], atol=tol), k


def test_kohya_and_diffusers_files_become_the_adapters_then_merge_and_generate(studio, mini, tmp_path):
    session = studio.new_session()
    subject, style = adapter_for(mini.unet, dora=True, seed=1), adapter_for(mini.unet, dora=True, seed=2)
    export_kohya(subject, mini, tmp_path / "kohya_dora.safetensors", dtype=torch.float32)
    weights = save_adapter(style, tmp_path / "diffusers")
    shutil.copyfile(weights, tmp_path / "style_lora.safetensors")

    got = studio.import_adapter(session, "subject", [tmp_path / "kohya_dora.safetensors"])
    assert got.info["base"] == "mini" and got.info["source"] == "kohya_dora.safetensors" and got.use_dora
    studio.import_adapter(session, "style", [tmp_path / "style_lora.safetensors"])
    paths = studio.paths(session)
    assert paths.has_adapter("subject") and paths.has_adapter("style")
    # Kept as our own folder: what later steps read gives the file's weights.
    assert_same_weights(load_adapter(paths.adapter("subject")), subject, mini)
    assert_same_weights(load_adapter(paths.adapter("style")), style, mini)
    assert not list(paths.root.rglob("*.import"))  # no staging left behind

    merge = studio.submit_merge(session, MergeForm(method="zipq", steps=2))
    studio.registry.wait(merge.id, 120)
    assert merge.status == "done", merge.error
    gen = studio.submit_generate(session, GenerateForm.parse("a photo of sks", "", 0, 2, 5.0, 64, 64, 1, 1.0, 1.0))
    studio.registry.wait(gen.id, 120)
    assert gen.status == "done" and "merged adapter" in gen.log[-1], gen.error


def test_a_peft_folder_config_sets_the_scale(studio, mini, tmp_path):
    session = studio.new_session()
    lora = adapter_for(mini.unet, dora=False, seed=3)
    r = lora.rank
    tensors = {}
    for key, layer in lora.layers.items():
        name = "base_model.model." + key.removeprefix("unet.")
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = layer.down, layer.up
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["to_q", "to_v"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    got = studio.import_adapter(session, "style", [tmp_path / "adapter_model.safetensors",
                                                   tmp_path / "adapter_config.json"])
    assert {layer.scale for layer in got.layers.values()} == {2.0}  # lora_alpha / r, not alpha = r


def test_refusals_are_messages_and_keep_what_was_there(studio, mini, tiny_sd1_dir, tmp_path):
    from zipq_core import load_base

    session = studio.new_session()
    lora = adapter_for(mini.unet, dora=False, seed=4)
    save_adapter(lora, tmp_path / "ok")
    studio.import_adapter(session, "subject", [tmp_path / "ok" / "pytorch_lora_weights.safetensors"])
    kept = (studio.paths(session).adapter("subject") / "pytorch_lora_weights.safetensors").read_bytes()

    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(ZipqError, match="safetensors files only"):
        studio.import_adapter(session, "subject", [tmp_path / "model.ckpt"])
    with pytest.raises(ZipqError, match="Send one adapter"):
        studio.import_adapter(session, "subject", [])
    big = tmp_path / "big.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(600_000)}, str(big))  # 2.4 MB, over this server's 2 MB limit
    with pytest.raises(ZipqError, match="at most 2 MB on this server"):
        studio.import_adapter(session, "subject", [big])
    other = load_base(str(tiny_sd1_dir), "cpu")  # an SD1.5 adapter on mini: its layers do not fit
    export_kohya(adapter_for(other.unet, dora=False, seed=5), other, tmp_path / "sd15.safetensors")
    with pytest.raises(ZipqError) as excinfo:
        studio.import_adapter(session, "subject", [tmp_path / "sd15.safetensors"])
    assert "Traceback" not in str(excinfo.value) and len(str(excinfo.value)) > 20
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(ZipqError):
        studio.import_adapter(session, "subject", [tmp_path / "junk.safetensors"])
    with pytest.raises(ZipqError, match="'subject' or the 'style'"):
        studio.import_adapter(session, "merged", [tmp_path / "ok" / "pytorch_lora_weights.safetensors"])
    assert (studio.paths(session).adapter("subject") / "pytorch_lora_weights.safetensors").read_bytes() == kept


def test_imports_count_in_the_session_quota(mini, tmp_path):
    registry = JobRegistry(root=tmp_path / "sessions")
    studio = Studio(mini, registry, quota=Quota(session_bytes=2**15), speed=plan.Speed(flops_per_second=2e10))
    try:
        session = studio.new_session()
        weights = save_adapter(adapter_for(mini.unet, dora=True, seed=6), tmp_path / "a")
        assert weights.stat().st_size > 2**14
        with pytest.raises(ZipqError, match="its limit is 0 MB"):
            studio.import_adapter(session, "style", [weights])
        assert not studio.paths(session).has_adapter("style")
    finally:
        registry.close()
