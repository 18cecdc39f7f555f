"""The CUDA paths: fp16/bf16 bases, bitsandbytes QDoRA kernels, strength semantics on the GPU.

Deselected by default (pyproject's `-m "not cuda"`); on a GPU machine run `pytest -m cuda`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zipq_core import GenerateConfig, TrainConfig, generate, load_adapter, load_base, train_adapter
from zipq_core.base import clear_cache
from zipq_core.data import DataConfig, prepare_images

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests were selected (-m cuda) on a machine without a CUDA GPU")
    yield
    clear_cache()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("quantize", ["none", "int8", "nf4"])
def test_train_and_generate_on_gpu(dtype, quantize, subject_dir, tmp_path):
    base = load_base("mini", device="cuda", dtype=dtype)
    cfg = TrainConfig(class_noun="thing", steps=5, quantize_base=quantize, learning_rate=5e-2)
    images = prepare_images(subject_dir, cfg.instance_prompt, DataConfig(), token=cfg.token)
    records = list(train_adapter(base, images, cfg, tmp_path / "a"))
    assert records[-1].done and all(np.isfinite(r.loss) for r in records[1:])
    adapter = load_adapter(tmp_path / "a")
    gcfg = GenerateConfig(prompt=cfg.instance_prompt, steps=4)
    plain = np.asarray(generate(base, gcfg)[0])
    assert np.array_equal(plain, np.asarray(generate(base, gcfg, [(adapter, 0.0)])[0]))
    assert not np.array_equal(plain, np.asarray(generate(base, gcfg, [(adapter, 1.0)])[0]))
