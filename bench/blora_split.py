"""B-LoRA's block split on mini, searched on the tuning split (issue 19, deliverable 3).

B-LoRA (arXiv 2403.14572) keeps the subject adapter's layers in the UNet blocks that carry content and the style
adapter's in those that carry style; on SDXL the paper finds them in the two attentions of ``up_blocks.0``. mini's
UNet is smaller (three levels, the finest without attention), so its split is chosen here, on tuning concepts
only (``zipq_mini.concepts.split("tuning")``): per tuning pair (subject i with style i), train a subject and a
style DoRA with mini's family defaults, merge them with B-LoRA under every candidate split in ``SPLITS``, generate
``--images`` from the merged file alone (1 / 1, one candidate: what the split itself carries) and score them with
the label-free judge among the tuning concepts. The chosen split maximises subject + style identification (ties:
fidelity), and goes into ``zipq_core.config.FAMILY_DEFAULTS["mini"].blora_split``.

    python bench/blora_split.py --adapters runs/blora_split --out bench/results/blora_split.json [--mini DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import common  # noqa: F401  (first: puts the checkout on the import path)
from common import concept_references, emit_json, load_mini_base, train_concept_adapter

import numpy as np
import torch

from zipq_core import GenerateConfig, generate, load_adapter
from zipq_core.config import MergeConfig
from zipq_core.merge import merge_adapters
from zipq_mini import concepts, judge, world

# Candidate (content, style) splits of mini's UNet: down_blocks.0 (16×16 latents, ResNets only), .1 and .2 (8×8
# and 4×4, with attention), mid_block (4×4), up_blocks.0 (4×4), .1 (8×8) with attention, .2 (16×16, ResNets only).
SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sdxl_paper": (("up_blocks.0.attentions.0.",), ("up_blocks.0.attentions.1.",)),
    "up0_vs_up12": (("up_blocks.0.",), ("up_blocks.1.", "up_blocks.2.")),
    "encoder_vs_decoder": (("down_blocks.", "mid_block."), ("up_blocks.",)),
    "coarse_vs_fine": (("down_blocks.1.", "down_blocks.2.", "mid_block.", "up_blocks.0."),
                       ("down_blocks.0.", "up_blocks.1.", "up_blocks.2.")),
    "all_but_finest_vs_finest": (("down_blocks.", "mid_block.", "up_blocks.0.", "up_blocks.1."), ("up_blocks.2.",)),
    "attention_vs_resnets": (("down_blocks.1.attentions.", "down_blocks.2.attentions.", "mid_block.attentions.",
                              "up_blocks.0.attentions.", "up_blocks.1.attentions."),
                             ("down_blocks.0.", "down_blocks.1.resnets.", "down_blocks.2.resnets.",
                              "mid_block.resnets.", "up_blocks.0.resnets.", "up_blocks.1.resnets.", "up_blocks.2.")),
}
PROMPT = "a photo of a {colour} sks shape in zkz style on a {background} background"


def score(j: judge.Judge, images, name: str, kind: str, refs: dict[str, np.ndarray]) -> tuple[float, float]:
    """(identification rate among the tuning concepts of that kind, mean cosine to the concept's references)."""
    emb = j.embed(images, kind)
    ids = [n == name for n in judge.identify(emb, refs)]
    return sum(ids) / len(ids), float((emb @ refs[name].T).mean())


def groups(pair: int, seed: int) -> list[tuple[str, str]]:
    """Two (colour, background) prompts per pair, drawn by the pair and seed; the colour contrasts."""
    rng = np.random.default_rng([seed, 61, pair])
    out = []
    for _ in range(2):
        colour = str(rng.choice(world.COLOUR_NAMES))
        backgrounds = [b for b in world.BACKGROUND_NAMES if b != "white" or colour != "yellow"]
        out.append((colour, str(rng.choice(backgrounds))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, required=True, help="trained adapters are kept (and reused) here")
    parser.add_argument("--images", type=int, default=8, help="images per pair and split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mini", type=Path, default=None, help="a candidate mini's folder (default: assets/mini)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    started = time.time()
    base, j = load_mini_base(args.mini), judge.load_judge()
    refs = {kind: concept_references(j, "tuning", kind) for kind in ("subject", "style")}
    tuning = concepts.split("tuning")
    pairs = list(zip(tuning.subjects, tuning.styles))  # subject i with style i: every tuning concept once
    rows: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for p, (subject, style) in enumerate(pairs):
        dirs = {}
        for kind, c in (("subject", subject), ("style", style)):
            work = args.adapters / f"{c.name}_seed{args.seed}"
            folder = concepts.write_example_set(c, work / "examples", args.seed)
            dirs[kind] = train_concept_adapter(base, kind, folder, work / "adapter", method="dora", seed=args.seed)
        for name, (content, look) in SPLITS.items():
            out = args.adapters / "merged" / f"{subject.name}__{style.name}__{name}"
            cfg = MergeConfig(method="blora", blora_content=content, blora_style=look, seed=args.seed)
            list(merge_adapters(base, dirs["subject"], dirs["style"], cfg, out))
            adapter = load_adapter(out / "pytorch_lora_weights.safetensors")
            images = []
            for k, (colour, background) in enumerate(groups(p, args.seed)):
                config = GenerateConfig(prompt=PROMPT.format(colour=colour, background=background),
                                        seed=1000 * args.seed + k, steps=20, num_images=args.images // 2)
                images += generate(base, config, [(adapter, 1.0)])
            subject_id, subject_fid = score(j, images, subject.name, "subject", refs["subject"])
            style_id, style_fid = score(j, images, style.name, "style", refs["style"])
            rows[name].append({"pair": f"{subject.name} × {style.name}", "subject_id": subject_id,
                               "style_id": style_id, "subject_fidelity": round(subject_fid, 4),
                               "style_fidelity": round(style_fid, 4)})
            print(f"{name}: {rows[name][-1]}", file=sys.stderr, flush=True)
    summary = {name: {k: round(statistics.fmean(r[k] for r in rs), 4)
                      for k in ("subject_id", "style_id", "subject_fidelity", "style_fidelity")}
               for name, rs in rows.items()}
    chosen = max(summary, key=lambda n: (summary[n]["subject_id"] + summary[n]["style_id"],
                                         summary[n]["subject_fidelity"] + summary[n]["style_fidelity"]))
    emit_json({"splits": {n: {"content": list(c), "style": list(s)} for n, (c, s) in SPLITS.items()},
               "summary": summary, "rows": rows, "chosen": chosen, "images_per_pair": args.images,
               "mini": str(args.mini or "assets/mini"), "seconds": round(time.time() - started, 1),
               "command": " ".join(sys.argv)}, args.out)


if __name__ == "__main__":
    main()
