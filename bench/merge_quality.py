"""Merge-quality benchmark on mini: every merge method against subject-only and style-only adapters.

For each held-out subject × held-out style pair and seed: train subject and style DoRA (and LoRA for
ZipLoRA) with the core's train function, merge with every method, generate "<subject prompt> in <style
token> style" images and score them with the offline evaluator. `zipq` and `zipq_int8` generate as the app
does on mini (config.Sliders: the strengths, the subject part weaker below the hand-off, and each image the best
of mini's FamilyDefaults.candidates, picked by the adapters themselves: zipq_core.generation.rerank); `zipq_one` is
the same with one
candidate per image, `zipq_constant` the same merge at constant 1/1 (its single file in any other tool);
`direct_handoff` and `direct_best_of` are the direct merge generated like `zipq_one` and `zipq`. `klora` is K-LoRA
(zipq_core.merge.klora: each layer takes the subject's or the style's change, chosen anew at every step) generated at
the same compute as `zipq` (same sliders, hand-off and candidates); it has no file, so no file-alone row. The other
methods generate at constant 1/1 with one candidate. Prints and writes JSON:

    methods.<name>.{subject_fidelity, style_fidelity, prompt_adherence, merge_seconds, adapter_bytes, …}
    int8_size_ratio, int8_image_mean_abs_diff / _max_abs_diff (INT8 vs float ZipQDoRA images, 0–255),
    settings, per_run

Usage: python bench/merge_quality.py [--pairs 4] [--seeds 3] [--steps 300] [--images 32] [--workers 2] [--out FILE]
                                    [--markdown FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, emit_json  # first: it puts the checkout on the import path

import torch

from zipq_core import GenerateConfig, TrainConfig, generate, load_adapter, load_base, train_adapter
from zipq_core.adapters import INT8_WEIGHTS_NAME, save_adapter
from zipq_core.config import FAMILY_DEFAULTS, MergeConfig, Sliders
from zipq_core.data import DataConfig, prepare_images
from zipq_core.merge import klora_plan, merge_adapters, slider_adapters
from zipq_mini.evaluator import load_evaluator, prompt_adherence, style_fidelity, subject_fidelity

EXAMPLES = ROOT / "assets" / "examples"
PAIRS = [("heart", "hatching"), ("moon", "grid"), ("arrow", "zigzag"), ("bolt", "bullseye"),
         ("heart", "zigzag"), ("moon", "bullseye"), ("arrow", "grid"), ("bolt", "hatching")]
METHODS = ["subject_only", "style_only", "direct", "direct_handoff", "direct_best_of", "zip", "zipq", "zipq_int8",
           "zipq_one", "zipq_constant", "ties", "dare", "blora", "klora"]
BEST_OF = FAMILY_DEFAULTS["mini"].candidates
CONSTANT = (Sliders(subject=1.0, style=1.0, subject_detail=1.0), 1)
APP = (Sliders(), BEST_OF)
ONE = (Sliders(), 1)
# How each merged row generates, (sliders, candidates) (the default: CONSTANT), and rows that reuse another's merge.
SLIDERS = {"zipq": APP, "zipq_int8": APP, "direct_best_of": APP, "zipq_one": ONE, "direct_handoff": ONE, "klora": APP}
REUSE = {"direct_handoff": "direct", "direct_best_of": "direct", "zipq_one": "zipq", "zipq_constant": "zipq"}


def train(base, kind: str, name: str, method: str, steps: int, seed: int, lr: float, out: Path) -> Path:
    """Train an adapter on an example set with the core's defaults; captions come from the sidecar files."""
    token = "sks" if kind == "subject" else "zkz"
    cfg = TrainConfig(kind=kind, token=token, class_noun=name if kind == "subject" else "picture", method=method,
                      steps=steps, seed=seed, learning_rate=lr)
    images = prepare_images(EXAMPLES / f"{kind}s" / name, cfg.instance_prompt, DataConfig(), token=token)
    for _ in train_adapter(base, images, cfg, out):
        pass
    return out


def sample(base, prompt: str, seed: int, count: int, adapters, schedule=None, **options) -> list:
    """`count` images in batches of 8 (GenerateConfig's batch limit is 16), batch k seeded `seed + k`; `schedule` is
    generate's (K-LoRA's per-step choice of layers); `options` are further GenerateConfig fields (handoff,
    negative_prompt, candidates).

    8 images per setting was too few: with the same adapters, the 4-pair mean of ZipQDoRA at seed 0 scored
    0.768 / 0.693 on 8 images and 0.648 / 0.602 on 64 (its sliders had been chosen on those 8).
    """
    images = []
    for k, start in enumerate(range(0, count, 8)):
        config = GenerateConfig(prompt=prompt, seed=seed + k, steps=20, num_images=min(8, count - start),
                                **options)
        images += generate(base, config, adapters, schedule=schedule)
    return images


def score(images, subject: str, style: str, evaluator) -> dict:
    subj = subject_fidelity(images, subject=subject, refs=_refs("subjects", subject), evaluator=evaluator)
    sty = style_fidelity(images, style=style, refs=_refs("styles", style), evaluator=evaluator)
    adherence = prompt_adherence(images, f"a {subject} in {style} style", evaluator)
    return {"subject_fidelity": subj["prob"], "subject_acc": subj["acc"], "subject_cosine": subj["cosine"],
            "style_fidelity": sty["prob"], "style_acc": sty["acc"], "style_cosine": sty["cosine"],
            "prompt_adherence": adherence["acc"]}


def _refs(kind: str, name: str):
    from zipq_core.evaluate import load_images

    return load_images(EXAMPLES / kind / name)


def run_pair(base, evaluator, subject: str, style: str, seed: int, args, work: Path) -> dict:
    dirs = {f"{kind}_{m}": train(base, kind, name, m, args.steps, seed, args.lr, work / f"{kind}_{m}")
            for kind, name in (("subject", subject), ("style", style)) for m in ("dora", "lora")}
    for kind in ("subject", "style"):
        save_adapter(load_adapter(dirs[f"{kind}_dora"]), work / f"{kind}_int8", storage="int8")
    prompt = f"a photo of sks {subject} in zkz style"
    results, images_of = {}, {}
    merged: dict[str, tuple[Path, float, int]] = {}
    for method in METHODS:
        started = time.time()
        sliders, candidates = SLIDERS.get(method, CONSTANT)
        schedule = None
        if method == "klora":  # no merged file: the two adapters, their layers scored once (merge_seconds)
            plan = klora_plan(base, dirs["subject_dora"], dirs["style_dora"], sliders)
            adapters, schedule, seconds = plan.adapters, plan.schedule, time.time() - started
            size = sum((dirs[f"{c}_dora"] / "pytorch_lora_weights.safetensors").stat().st_size
                       for c in ("subject", "style"))
        elif method in ("subject_only", "style_only"):
            kind = method.split("_")[0]
            adapters = [(load_adapter(dirs[f"{kind}_dora"]), 1.0)]
            seconds, size = 0.0, (dirs[f"{kind}_dora"] / "pytorch_lora_weights.safetensors").stat().st_size
        else:
            if method not in REUSE:
                merged[method] = merge(base, method, dirs, seed, args, work)
            out, seconds, size = merged[REUSE.get(method, method)]
            adapters = slider_adapters(out, sliders.subject, sliders.style, sliders.subject_detail)
        images = sample(base, prompt, 1000 * seed, args.images, adapters, schedule, candidates=candidates)
        images_of[method] = images
        results[method] = {**score(images, subject, style, evaluator), "merge_seconds": seconds,
                           "adapter_bytes": size}
        results[method]["wall_seconds"] = time.time() - started
    fp16 = save_adapter(load_adapter(dirs["subject_dora"]), work / "subject_fp16", dtype=torch.float16).stat().st_size
    int8 = (work / "subject_int8" / INT8_WEIGHTS_NAME).stat().st_size
    return {"subject": subject, "style": style, "seed": seed, "methods": results, "int8_size_ratio": int8 / fp16,
            **image_difference(images_of["zipq"], images_of["zipq_int8"])}


def merge(base, method: str, dirs: dict, seed: int, args, work: Path) -> tuple[Path, float, int]:
    """Merge the run's adapters with one method → (merged folder, merge seconds, file bytes)."""
    name = "zipq" if method == "zipq_int8" else method
    kind = "lora" if method == "zip" else ("int8" if method == "zipq_int8" else "dora")
    if kind == "int8":  # merge from the INT8 files (dequantized on load) with their training views
        for c in ("subject", "style"):
            _copy_views(dirs[f"{c}_dora"], work / f"{c}_int8")
    subject_dir = work / "subject_int8" if kind == "int8" else dirs[f"subject_{kind}"]
    style_dir = work / "style_int8" if kind == "int8" else dirs[f"style_{kind}"]
    out = work / f"merged_{method}"
    cfg = MergeConfig(method=name, steps=args.merge_steps, learning_rate=args.merge_lr, seed=seed)
    last = list(merge_adapters(base, subject_dir, style_dir, cfg, out))[-1]
    return out, last.elapsed, last.summary["adapter_bytes"]


def image_difference(a: list, b: list) -> dict:
    """Pixel difference of two image lists made with the same seeds (uint8 units, 0–255)."""
    import numpy as np

    diff = np.abs(np.stack([np.asarray(x, np.int16) for x in a]) - np.stack([np.asarray(x, np.int16) for x in b]))
    return {"int8_image_mean_abs_diff": float(diff.mean()), "int8_image_max_abs_diff": float(diff.max())}


def _copy_views(src: Path, dst: Path) -> None:
    import shutil

    if not (dst / "train_images").exists():
        shutil.copytree(src / "train_images", dst / "train_images")


def aggregate(runs: list[dict]) -> dict:
    methods = {}
    for method in METHODS:
        rows = [r["methods"][method] for r in runs]
        methods[method] = {k: statistics.fmean(row[k] for row in rows) for k in rows[0]}
    means = {k: statistics.fmean(r[k] for r in runs) for k in ("int8_size_ratio", "int8_image_mean_abs_diff")}
    return {"methods": methods, **means, "int8_image_max_abs_diff": max(r["int8_image_max_abs_diff"] for r in runs)}


def markdown(result: dict) -> str:
    lines = ["| method | subject fidelity | style fidelity | prompt adherence | merge s | adapter bytes |",
             "|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {m['subject_fidelity']:.3f} | {m['style_fidelity']:.3f} | "
                     f"{m['prompt_adherence']:.3f} | {m['merge_seconds']:.1f} | {int(m['adapter_bytes'])} |")
    return "\n".join(lines) + (f"\n\nINT8 / fp16 adapter file size: {result['int8_size_ratio']:.3f}. Images from the "
                               f"INT8 vs the float ZipQDoRA merge (same seeds): mean |Δ| "
                               f"{result['int8_image_mean_abs_diff']:.2f}, max |Δ| "
                               f"{result['int8_image_max_abs_diff']:.0f} (of 255).\n")


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The training, merge and generation settings every merge benchmark shares (and --out)."""
    parser.add_argument("--steps", type=int, default=300, help="training steps per adapter")
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--merge-steps", type=int, default=100)
    parser.add_argument("--merge-lr", type=float, default=3e-3)
    parser.add_argument("--images", type=int, default=32, help="images generated per method and setting")
    parser.add_argument("--out", type=Path, default=None)


_WORKER: dict = {}


def _load_worker(workers: int) -> None:
    """Each worker process loads mini and the evaluator once and shares the machine's threads."""
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    torch.set_grad_enabled(True)
    _WORKER.update(base=load_base("mini"), evaluator=load_evaluator())


def _run_task(run, subject: str, style: str, seed: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return run(_WORKER["base"], _WORKER["evaluator"], subject, style, seed, args, Path(tmp))


def run_tasks(run, tasks: list[tuple[str, str, int]], args) -> list[dict]:
    """`run(base, evaluator, subject, style, seed, args, work)` for each (subject, style, seed) in `args.workers`
    spawned processes (`run` must be a module-level function); results in task order, so the JSON does not
    depend on the number of workers."""
    started, runs = time.time(), []
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_load_worker, initargs=(args.workers,)) as pool:
        futures = [pool.submit(_run_task, run, *task, args) for task in tasks]
        for (subject, style, seed), future in zip(tasks, futures):
            runs.append(future.result())
            print(f"{subject} × {style} seed {seed}: done at {time.time() - started:.0f} s", file=sys.stderr)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    add_recipe_args(parser)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel, one process each (give each a core: the runs are CPU-bound)")
    args = parser.parse_args()
    tasks = [(subject, style, seed) for subject, style in PAIRS[: args.pairs] for seed in range(args.seeds)]
    started = time.time()
    runs = run_tasks(run_pair, tasks, args)
    result = {**aggregate(runs), "settings": vars(args) | {"out": str(args.out), "markdown": str(args.markdown)},
              "seconds": time.time() - started, "per_run": runs}
    emit_json(result, args.out)
    if args.markdown:
        args.markdown.write_text(markdown(result))


if __name__ == "__main__":
    main()
