"""Train the label-free judge's heads (zipq_mini.judge) and validate it on the tuning and test splits.

    PYTHONPATH=. taskset -c 1 python scripts/train_judge.py [--work runs/judge] [--steps 1500] [--concepts 400]
        [--views 6] [--out assets/judge]

1. A pool of concepts drawn from zipq_mini.concepts' families with seeds of their own (never the splits'),
   ``--views`` augmented renders each, described once (cached in ``--work``);
2. InfoNCE on pairs of views of the same concept, per kind; checkpoints in ``--work`` every 100 steps, so a
   stopped run resumes where it was;
3. leave-one-out identification on the tuning split (clean and augmented renders) for the raw descriptors and
   for the heads: the heads ship only if they do at least as well as the raw descriptors there (the choice is
   made on the tuning split); then the same figures on the test split, reported, never used to choose;
4. ``judge.safetensors``, ``config.json`` and ``validation.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from zipq_mini import concepts, judge

POOL_SEED = 777_000  # concepts of the pool come from this seed stream; the splits use 1009 and 2027


def build_pool(kind: str, n: int, views: int, work: Path) -> np.ndarray:
    """Descriptors (n, views, D) of ``views`` augmented renders of ``n`` pool concepts (cached in ``work``)."""
    path = work / f"pool_{kind}_{n}x{views}.npy"
    if path.is_file():
        return np.load(path)
    rng = np.random.default_rng([POOL_SEED, judge.KINDS.index(kind)])
    draw = concepts.random_subject if kind == "subject" else concepts.random_style
    pool = np.stack([judge.describe([judge.training_view(c, rng) for _ in range(views)], kind)
                     for c in (draw(rng, f"pool_{i}") for i in range(n))])
    np.save(path, pool)
    return pool


def training_steps(net: judge.JudgeNet, pools: dict[str, np.ndarray], steps: int, work: Path, batch: int = 128,
                   lr: float = 2e-3, temperature: float = 0.1):
    """InfoNCE steps, resuming from ``work/ckpt.pt``; yields (step, {kind: loss})."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start, ckpt = 0, work / "ckpt.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    gen = np.random.default_rng([POOL_SEED, 99, start])
    tensors = {k: torch.from_numpy(p) for k, p in pools.items()}
    for step in range(start, steps):
        losses = {}
        opt.zero_grad()
        for kind, pool in tensors.items():
            n, views, _ = pool.shape
            idx = torch.from_numpy(gen.choice(n, size=min(batch, n), replace=False))
            pick = np.stack([gen.choice(views, size=2, replace=False) for _ in range(len(idx))])  # (B, 2)
            a, b = pool[idx, torch.from_numpy(pick[:, 0])], pool[idx, torch.from_numpy(pick[:, 1])]
            loss = judge.info_nce(net(a, kind), net(b, kind), temperature)
            loss.backward()
            losses[kind] = loss.item()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
        yield step + 1, losses


def validate_augmented(j: judge.Judge | None, split: str, per_concept: int = 16, seed: int = 7) -> dict[str, float]:
    """Leave-one-out identification of augmented renders (harder than clean ones: blur, noise, resampling)."""
    s = concepts.split(split)
    out = {}
    for kind, group in (("subject", s.subjects), ("style", s.styles)):
        emb = {}
        for c in group:
            rng = np.random.default_rng([seed, concepts._name_seed(c.name)])
            images = [judge.augment(im, rng) for im in concepts.reference_images(c, per_concept, seed)]
            e = judge.describe(images, kind) if j is None else j.embed(images, kind)
            emb[c.name] = e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-8)
        out[kind] = judge.leave_one_out(emb)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/judge"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--concepts", type=int, default=400)
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--out", type=Path, default=judge.JUDGE_DIR)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.set_num_threads(1)
    pools = {k: build_pool(k, args.concepts, args.views, args.work) for k in judge.KINDS}
    print(f"pools built at {time.time() - started:.0f} s", flush=True)
    j = judge.build_judge()
    for kind, pool in pools.items():  # standardise descriptors with the pool's statistics
        flat = torch.from_numpy(pool.reshape(-1, pool.shape[-1]))
        getattr(j.net, f"{kind}_mean").copy_(flat.mean(0))
        getattr(j.net, f"{kind}_std").copy_(flat.std(0).clamp_min(1e-3))
    j.net.train()
    for step, losses in training_steps(j.net, pools, args.steps, args.work):
        if step % 100 == 0:
            print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()), flush=True)
    j.net.eval()
    figures = {}
    for split in ("tuning", "test"):
        figures[split] = {name: {"clean": judge.validate(m, split), "augmented": validate_augmented(m, split),
                                 "in_pairs": judge.validate_pairs(m, split)}
                          for name, m in (("raw", None), ("head", j))}
        print(split, json.dumps(figures[split]), flush=True)
    tuning = figures["tuning"]
    # in_pairs is reported, not used to choose: it was added after the heads had been trained and chosen.
    ships = all(tuning["head"][v][k] >= tuning["raw"][v][k] for v in ("clean", "augmented") for k in judge.KINDS)
    result = {"validation": figures, "heads_chosen_on_tuning": ships, "settings": {k: str(v) for k, v in
                                                                                 vars(args).items()},
              "protocol": "leave-one-out nearest-centroid identification, 16 renders per concept, seed 7",
              "seconds": round(time.time() - started, 1)}
    if not ships:  # the raw descriptors judge; the heads' figures stay in validation.json as what was tried
        print("the heads do not beat the raw descriptors on the tuning split: shipping the raw descriptors",
              flush=True)
        j.cfg.use_head = j.net.use_head = False
    judge.save_judge(j, args.out)
    (args.out / "validation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
