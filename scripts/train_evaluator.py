"""Recipe: train the offline evaluator on rendered ground truth (every subject and style, held-out ones too).

    PYTHONPATH=. taskset -c 1 python scripts/train_evaluator.py [--steps 3000] [--out assets/evaluator]

Images come from ``world.render_dataset`` (cached under ``runs/data``); each batch is degraded the way a small
VAE + diffusion model degrades images (blur, down/up-sampling, noise, JPEG, slight colour shifts) so the
evaluator judges generations fairly. Prints test accuracy on freshly rendered images of an unseen seed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zipq_mini import evaluator, world

TEST_SEED = 987_654  # never used for training data


def cached_dataset(n: int, seed: int, held_out: bool | str, cache: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rendered images + labels, from ``cache`` when it exists with the same size."""
    if cache.is_file():
        d = np.load(cache)
        if len(d["images"]) >= n:
            return d["images"][:n], {h: d[h][:n] for h in evaluator.HEADS}
    imgs, scenes = world.render_dataset(n, seed, held_out)
    lab = world.labels(scenes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=imgs, **lab)
    return imgs, lab


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x (B, 3, H, W)."""
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=3)


def degrade(batch: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random degradations of a uint8 batch (B, 64, 64, 3) -> float tensor (B, 3, 64, 64) in [-1, 1]."""
    batch = batch.copy()
    for i in np.where(rng.random(len(batch)) < 0.25 * strength)[0]:
        batch[i] = _jpeg(batch[i], int(rng.integers(25, 90)))
    x = torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    b = len(x)
    sel = torch.from_numpy(rng.random(b) < 0.5 * strength)
    if sel.any():
        x[sel] = _blur(x[sel], float(rng.uniform(0.4, 1.3)))
    sel = torch.from_numpy(rng.random(b) < 0.25 * strength)
    if sel.any():
        x[sel] = F.interpolate(F.interpolate(x[sel], size=int(rng.choice([24, 32])), mode="area"), size=64,
                               mode="bilinear", align_corners=False)
    gain = torch.from_numpy(rng.uniform(1 - 0.1 * strength, 1 + 0.1 * strength, (b, 1, 1, 1)).astype(np.float32))
    shift = torch.from_numpy(rng.uniform(-0.06, 0.06, (b, 3, 1, 1)).astype(np.float32) * strength)
    noise = torch.from_numpy(rng.uniform(0, 0.08, (b, 1, 1, 1)).astype(np.float32) * strength)
    x = x * gain + shift + noise * torch.randn_like(x)
    flip = torch.from_numpy(rng.random(b) < 0.5)
    x[flip] = x[flip].flip(3)
    return x.clamp(-1, 1)


def train(steps: int = 3000, batch: int = 64, lr: float = 2e-3, n_train: int = 24000, seed: int = 0,
          data: str = "runs/data/eval_any.npz", log_every: int = 100):
    """Generator of step records while training an evaluator; returns it at the end (``StopIteration.value``)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    imgs, lab = cached_dataset(n_train, 1001, "any", Path(data))
    ev = evaluator.build_evaluator(seed=seed)
    net = ev.net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    weights = {"subject": 1.0, "style": 1.0, "colour": 1.0, "background": 0.3}
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(imgs), batch)
        x = degrade(imgs[idx], rng)
        out = net(x)
        loss = sum(w * F.cross_entropy(out[h], torch.from_numpy(lab[h][idx])) for h, w in weights.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            yield {"step": step, "loss": float(loss.detach()), "sec": time.time() - t0}
    net.eval()
    return ev


def test_accuracy(ev: evaluator.Evaluator, n: int = 2000, seed: int = TEST_SEED, degraded: bool = False) -> dict:
    """Accuracy per head on freshly rendered images (all subjects and styles) of an unseen seed."""
    imgs, scenes = world.render_dataset(n, seed, "any")
    lab = world.labels(scenes)
    if degraded:
        x = degrade(imgs, np.random.default_rng(seed))
        imgs = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return evaluator.accuracy(ev, imgs, lab)


def main(steps: int, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    gen = train(steps=steps)
    while True:
        try:
            rec = next(gen)
            print(json.dumps(rec), flush=True)
        except StopIteration as stop:
            ev = stop.value
            break
    evaluator.save_evaluator(ev, out)
    ev = evaluator.load_evaluator(out)  # measure the shipped fp16 weights
    res = {"clean": test_accuracy(ev), "degraded": test_accuracy(ev, degraded=True)}
    print(json.dumps(res), flush=True)
    (Path(out) / "metrics.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default="assets/evaluator")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    main(a.steps, a.out, a.threads)
