"""Wall time of the README's CLI commands on mini, as a user runs them (fresh processes, loading included).

Trains a DoRA (50 steps, 64 px) on an example subject with broken files mixed in, then generates at
strength 0, 0.8 and 1 and checks strength 0 against no adapter. Prints JSON:
    train_wall_s, generate_wall_s (median), strength0_identical, strength1_differs, rejected

Usage: python bench/core_speed.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit_json  # bench/ is on sys.path when a benchmark runs as a script

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> tuple[dict, float]:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "zipq_core", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout), time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from data_fixtures import write_broken_files  # the same broken files the tests use

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        shutil.copytree(ROOT / "assets/examples/subjects/heart", images)
        write_broken_files(images)
        out = Path(tmp) / "OUT"
        summary, train_wall = _cli("train", "--base", "mini", "--images", str(images), "--kind", "subject",
                                   "--token", "sks", "--class-noun", "heart", "--method", "dora", "--steps", "50",
                                   "--seed", "0", "--out", str(out))
        common = ["--base", "mini", "--prompt", "a photo of sks heart", "--seed", "0", "--steps", "8"]
        walls, pictures = [], {}
        for label, extra in (("none", []), ("zero", ["--adapter", f"{out}:0"]), ("one", ["--adapter", str(out)])):
            _, wall = _cli("generate", *extra, *common, "--out", f"{tmp}/{label}.png")
            walls.append(wall)
            pictures[label] = np.asarray(Image.open(f"{tmp}/{label}.png"))
    result = {"train_wall_s": round(train_wall, 2), "train_loop_s": summary["train_seconds"],
              "generate_wall_s": round(statistics.median(walls), 2),
              "strength0_identical": bool(np.array_equal(pictures["none"], pictures["zero"])),
              "strength1_differs": not np.array_equal(pictures["none"], pictures["one"]),
              "rejected": summary["rejected"]}
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
