"""QDoRA memory and speed: base weight bytes, peak memory while training, seconds per step, DoRA vs LoRA.

Each configuration (base precision fp32 / bf16 / int8 / nf4 × method dora / lora) trains in its own
subprocess so its peak resident memory (CPU: ru_maxrss) or peak CUDA memory is its own.

Usage: python bench/qdora_memory.py [--base mini] [--steps 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, emit_json  # first: it puts the checkout on the import path

CONFIGS = [(p, m) for p in ("fp32", "bf16", "int8", "nf4") for m in ("dora", "lora")]


def worker(base_spec: str, precision: str, method: str, steps: int) -> dict:
    """Train `steps` steps in this process and report its numbers."""
    import tempfile

    import torch

    from zipq_core import TrainConfig, load_base, train_adapter
    from zipq_core.data import DataConfig, prepare_images
    from zipq_core.train.qdora import build_quantized_unet, weight_bytes

    dtype = "bf16" if precision == "bf16" else "fp32"
    base = load_base(base_spec, dtype=dtype)
    quant = precision if precision in ("int8", "nf4") else "none"
    unet_bytes = weight_bytes(base.unet if quant == "none" else build_quantized_unet(base.unet, quant, base.device))
    cfg = TrainConfig(class_noun="heart", steps=steps, method=method, quantize_base=quant,
                      resolution=base.default_size)
    images = prepare_images(ROOT / "assets/examples/subjects/heart", cfg.instance_prompt,
                            DataConfig(resolution=cfg.resolution), token=cfg.token)
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        records = list(train_adapter(base, images, cfg, tmp))
    step_times = records[-1].elapsed / steps
    peak = (torch.cuda.max_memory_allocated() if base.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"precision": precision, "method": method, "unet_weight_bytes": unet_bytes, "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda_allocated" if base.device.type == "cuda" else "process_rss",
            "sec_per_step": step_times, "final_loss": records[-1].loss, "device": base.device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="mini")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("PRECISION", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.base, *args.worker, args.steps)))
        return
    rows = []
    for precision, method in CONFIGS:
        started = time.time()
        proc = subprocess.run([sys.executable, __file__, "--base", args.base, "--steps", str(args.steps),
                               "--worker", precision, method], capture_output=True, text=True)
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            rows.append({"precision": precision, "method": method, "error": proc.stderr.strip().splitlines()[-1]})
        rows[-1]["wall_seconds"] = round(time.time() - started, 1)
        print(json.dumps(rows[-1]), file=sys.stderr)
    speed = {r["precision"]: r for r in rows if r.get("method") == "dora" and "error" not in r}
    lora = {r["precision"]: r for r in rows if r.get("method") == "lora" and "error" not in r}
    result = {"base": args.base, "steps": args.steps, "runs": rows,
              "dora_over_lora_time": {p: speed[p]["sec_per_step"] / lora[p]["sec_per_step"]
                                      for p in speed if p in lora}}
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
