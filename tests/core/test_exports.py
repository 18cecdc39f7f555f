"""Exports for other tools: each tool's own weight math (tests/readers.py, or diffusers itself) applied to the file
the studio writes for it gives the studio's fused weights within 1 % of each layer's change (issue 18)."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from safetensors import safe_open

from zipq_core import ZipqError
from zipq_core.adapters import Adapter, fuse_weight, load_adapter, resolve_module, save_adapter
from zipq_core.adapters.export import FORMATS, base_fingerprint, export_adapter
from zipq_core.adapters.kohya import import_kohya, kohya_name
from zipq_core.merge.parts import combine_parts

import readers
from helpers import adapter_for, random_layer

KOHYA_READERS = ("comfyui", "forge", "a1111", "lycoris", "kohya")
KINDS = ("lora", "dora", "merged", "int8")


def _within_bound(w_reader: torch.Tensor, w_studio: torch.Tensor, w0: torch.Tensor) -> tuple[bool, float]:
    """The issue's bound, computed here on its own: ‖W_r − W_s‖ ≤ 0.01·‖W_s − W0‖, or ≤ 1e-6·‖W0‖ for a change
    below 1e-4·‖W0‖. Returns (met, the relative error)."""
    diff = (w_reader - w_studio).norm()
    change = (w_studio - w0).norm()
    if change < 1e-4 * w0.norm():
        return bool(diff <= 1e-6 * w0.norm()), float(diff / w0.norm())
    return bool(diff <= 0.01 * change), float(diff / change)


def _style(unet: torch.nn.Module) -> Adapter:
    """A rank-8 LoRA at scale 1 on to_v, to_out.0 and the ResNets' 3×3 conv1: beside a rank-4 DoRA subject on
    to_q/to_v, a merge has layers of rank 4, 8 and 12, DoRA and not, Linear and Conv2d."""
    layers = {}
    for name, module in unet.named_modules():
        conv = name.endswith("conv1") and isinstance(module, torch.nn.Conv2d)
        if conv or (name.endswith(("to_v", "to_out.0")) and isinstance(module, torch.nn.Linear)):
            out, inp = module.weight.shape[:2]
            layer = random_layer(out, inp, 8, False, seed=100 + len(layers), conv=conv)
            layer.scale = 1.0 if not conv else 0.05
            layers[f"unet.{name}"] = layer
    return Adapter(layers, use_dora=False, info={"kind": "style", "token": "zkz"})


@pytest.fixture(scope="module")
def adapters(mini, tmp_path_factory) -> dict[str, Adapter]:
    """A LoRA, a DoRA, a merge of the DoRA with a LoRA style, and the DoRA read back from INT8 storage."""
    lora = adapter_for(mini.unet, dora=False, seed=11)
    dora = adapter_for(mini.unet, dora=True, seed=12)
    dora.info.update(class_noun="heart")
    info = {"kind": "merged", "subject": {"token": "sks", "class_noun": "heart"}, "style": {"token": "zkz"}}
    merged = combine_parts(mini.pipe, dora, _style(mini.unet), info)
    folder = tmp_path_factory.mktemp("int8")
    save_adapter(dora, folder, storage="int8")
    return {"lora": lora, "dora": dora, "merged": merged, "int8": load_adapter(folder)}


def _tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _originals(base, adapter: Adapter) -> dict[str, torch.Tensor]:
    return {key: resolve_module(base.pipe, key).weight.detach().float().clone() for key in adapter.layers}


def _assert_reproduces(weights: dict[str, torch.Tensor], adapter: Adapter, originals: dict[str, torch.Tensor],
                       label: str) -> None:
    failures = []
    for key, layer in adapter.layers.items():
        ok, error = _within_bound(weights[key], fuse_weight(originals[key], [(layer, 1.0)]), originals[key])
        if not ok:
            failures.append(f"{key}: {error:.4f}")
    assert not failures, f"{label}: {len(failures)} layers over the bound, e.g. {failures[:3]}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reader", KOHYA_READERS)
def test_each_readers_math_reproduces_the_studio_weights(mini, adapters, reader, kind, tmp_path):
    adapter = adapters[kind]
    report = export_adapter(adapter, mini, reader, tmp_path / f"{reader}.safetensors")
    tensors, meta = _tensors(report.path)
    names = {kohya_name(key, mini.arch): key for key in adapter.layers}
    assert set(readers.layers_of(tensors)) == set(names)
    originals = _originals(mini, adapter)
    computed = readers.READERS[reader](tensors, {name: originals[key] for name, key in names.items()})
    _assert_reproduces({names[n]: w for n, w in computed.items()}, adapter, originals, f"{reader} × {kind}")
    assert report.max_relative_error <= 0.01 and report.bytes == report.path.stat().st_size
    assert meta["modelspec.trigger_phrase"].startswith("sks")
    if adapter.use_dora and reader in ("a1111", "kohya"):  # no DoRA form these tools compute as the studio does
        assert report.ranks and not any(k.endswith(".dora_scale") for k in tensors)
    if adapter.use_dora and reader in ("comfyui", "forge", "lycoris"):
        assert any(k.endswith(".dora_scale") for k in tensors) and not report.ranks


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_reads_the_diffusers_export_exactly(adapters, kind, tmp_path):
    """diffusers itself (load_lora_weights + fuse_lora) on a fresh copy of mini, not a re-implementation."""
    from zipq_mini.pipeline import load_mini

    adapter = adapters[kind]
    pipe = load_mini()
    report = export_adapter(adapter, types.SimpleNamespace(pipe=pipe, arch="sdxl", spec="mini", default_size=64),
                            "diffusers", tmp_path / "pytorch_lora_weights.safetensors")
    originals = _originals(types.SimpleNamespace(pipe=pipe), adapter)
    pipe.load_lora_weights(str(report.path))
    pipe.fuse_lora()
    fused = {key: resolve_module(pipe, key).weight.detach().float() for key in adapter.layers}
    _assert_reproduces(fused, adapter, originals, f"diffusers × {kind}")


@pytest.mark.parametrize("fmt", ["comfyui", "a1111", "lycoris", "kohya", "diffusers", "int8"])
def test_import_of_export_is_the_adapter(mini, adapters, fmt, tmp_path):
    """import(export(x)) == x within the bound: kohya files through import_kohya (a ComfyUI-solved dora_scale
    turned back into the magnitude), the diffusers file and the INT8 folder through load_adapter."""
    originals = _originals(mini, adapters["merged"])
    for kind in ("dora", "merged"):
        adapter = adapters[kind]
        out = tmp_path / (kind if fmt == "int8" else f"{kind}.safetensors")
        report = export_adapter(adapter, mini, fmt, out, dtype=torch.float32)
        back = load_adapter(report.path) if fmt in ("diffusers", "int8") else import_kohya(report.path, mini)
        weights = {key: fuse_weight(originals[key], [(back.layers[key], 1.0)]) for key in adapter.layers}
        if fmt == "int8":  # INT8 storage is lossy by design: its own bound (adapters.int8) is tested elsewhere
            assert report.max_relative_error < 0.05
            continue
        _assert_reproduces(weights, adapter, originals, f"import({fmt}) × {kind}")


def test_solved_and_baked_files_carry_the_base_and_the_trigger_words(mini, adapters, tmp_path):
    adapter = adapters["dora"]
    report = export_adapter(adapter, mini, "comfyui", tmp_path / "c.safetensors")
    _, meta = _tensors(report.path)
    assert meta["zipq.base"] == "mini" and meta["zipq.base_sha256"] == report.base_sha256
    assert len(report.base_sha256) == 64 and report.base_sha256 == base_fingerprint(mini, adapter.layers)
    other = types.SimpleNamespace(pipe=types.SimpleNamespace(unet=copy.deepcopy(mini.unet)))
    key = next(iter(adapter.layers))
    with torch.no_grad():
        resolve_module(other.pipe, key).weight[0, 0] += 1e-3
    assert base_fingerprint(other, adapter.layers) != report.base_sha256  # another base, another hash
    assert json.loads(meta["zipq.trigger"]) == {"token": "sks", "class_noun": "heart"}
    assert meta["modelspec.trigger_phrase"] == "sks heart"
    assert json.loads(meta["ss_tag_frequency"]) == {"sks": {"sks heart": 1}}
    lora = export_adapter(adapters["lora"], mini, "comfyui", tmp_path / "plain.safetensors")
    assert "zipq.base_sha256" not in _tensors(lora.path)[1] and not lora.base_sha256  # exact on any base
    merged = _tensors(export_adapter(adapters["merged"], mini, "a1111", tmp_path / "m.safetensors").path)[1]
    assert merged["modelspec.trigger_phrase"] == "sks heart in zkz style" and "zipq.base_sha256" in merged


def test_the_old_dora_file_is_wrong_in_comfyui_and_a1111(mini, adapters, tmp_path):
    """Why the formats exist: the same DoRA written as LyCORIS reads it (m as [out, 1]) misses the bound in
    ComfyUI (÷‖W0‖) and far more in A1111 (per input column), while LyCORIS reproduces it."""
    adapter = adapters["dora"]
    tensors, _ = _tensors(export_adapter(adapter, mini, "lycoris", tmp_path / "l.safetensors").path)
    names = {kohya_name(key, mini.arch): key for key in adapter.layers}
    originals = _originals(mini, adapter)
    by_name = {name: originals[key] for name, key in names.items()}
    worst = {}
    for reader in ("lycoris", "comfyui", "a1111"):
        computed = readers.READERS[reader](tensors, by_name)
        worst[reader] = max(_within_bound(computed[n], fuse_weight(originals[k], [(adapter.layers[k], 1.0)]),
                                          originals[k])[1] for n, k in names.items())
    assert worst["lycoris"] <= 0.01 < worst["comfyui"] < worst["a1111"]


def test_bake_writes_a_comfyui_dora_as_plain_lora_within_the_bound(mini, adapters, tmp_path):
    adapter = adapters["dora"]
    report = export_adapter(adapter, mini, "comfyui", tmp_path / "baked.safetensors", bake=True)
    tensors, meta = _tensors(report.path)
    assert not any(k.endswith(".dora_scale") for k in tensors) and len(report.ranks) == len(adapter.layers)
    assert meta["ss_network_module"] == "networks.lora" and meta["zipq.base_sha256"] == report.base_sha256
    names = {kohya_name(key, mini.arch): key for key in adapter.layers}
    originals = _originals(mini, adapter)
    computed = readers.comfyui(tensors, {name: originals[key] for name, key in names.items()})
    _assert_reproduces({names[n]: w for n, w in computed.items()}, adapter, originals, "comfyui --bake")


def test_bad_format_and_out_names_are_refused(mini, adapters, tmp_path):
    with pytest.raises(ZipqError, match="Unknown export format 'webui'.*comfyui"):
        export_adapter(adapters["lora"], mini, "webui", tmp_path / "x.safetensors")
    with pytest.raises(ZipqError, match=r"\.safetensors file name"):
        export_adapter(adapters["lora"], mini, "comfyui", tmp_path / "x.ckpt")
    with pytest.raises(ZipqError, match="folder"):
        export_adapter(adapters["lora"], mini, "int8", tmp_path / "x.safetensors")


def test_cli_formats_are_the_export_formats():
    from zipq_core.cli import EXPORT_FORMATS

    assert EXPORT_FORMATS == tuple(FORMATS)


def test_cli_export_of_an_int8_adapter(mini, adapters, tmp_path):
    from zipq_core.cli import main

    save_adapter(adapters["dora"], tmp_path / "a", storage="int8")
    out = tmp_path / "a1111.safetensors"
    assert main(["export", "--base", "mini", "--adapter", str(tmp_path / "a"), "--format", "a1111",
                 "--out", str(out)]) == 0
    assert out.exists() and import_kohya(out, mini).layers.keys() == adapters["dora"].layers.keys()
    assert main(["export", "--base", "mini", "--adapter", str(tmp_path / "a"), "--format", "comfyui",
                 "--out", str(tmp_path / "bad.pt")]) == 2


def test_sdxl_names_and_mixed_ranks_in_diffusers_kohya_converter(tiny_sdxl_dir, tmp_path):
    """On a tiny SDXL pipeline: a DoRA exported for A1111 (baked layers of many ranks, one alpha) loads through
    diffusers' own kohya converter onto the right modules at the right scale (names and ranks from the file)."""
    from diffusers import DiffusionPipeline

    from zipq_core import load_base

    base = load_base(str(tiny_sdxl_dir))
    adapter = adapter_for(base.unet, dora=True, seed=21)
    report = export_adapter(adapter, base, "a1111", tmp_path / "a1111.safetensors")
    assert len(set(report.ranks.values())) > 1
    pipe = DiffusionPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True)
    originals = _originals(types.SimpleNamespace(pipe=pipe), adapter)
    pipe.load_lora_weights(str(report.path))
    pipe.fuse_lora()
    fused = {key: resolve_module(pipe, key).weight.detach().float() for key in adapter.layers}
    _assert_reproduces(fused, adapter, originals, "diffusers kohya converter × a1111 on SDXL")
