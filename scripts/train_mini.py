"""Recipe: train the bundled ``mini`` SDXL-architecture model from scratch on the procedural world, on CPU.

Stages (run in this order; each resumes where it stopped; see scripts/README_mini.md for the exact commands):

    vae    train the VAE (L1 + MSE + the evaluator's features as a perceptual loss + a tiny KL), then GATE it:
           the evaluator must classify its reconstructions >= 95 % right on subject, style and colour
    gate   re-run the gate on the VAE in --out
    unet   train both CLIP text encoders and the UNet jointly (EMA; captions dropped to all-zero text
           inputs 10 % of the time, matching the pipeline's force_zeros_for_empty_prompt); refuses to start
           unless the gate passed (--force skips that, for tests). --device cuda trains on a GPU (the batches are
           drawn on the CPU, so they are the same anywhere); --unet-channels 64,128,256 starts a fresh UNet of
           those widths on the VAE and text encoders in --out (scripts/device_mini.sh: the GPU recipe)
    decoder  fine-tune the VAE decoder alone, the encoder frozen (so the latents and the UNet stay valid), on
           base renders half of which are redrawn in generic textures (world.generic_pattern): a better codec
           for textures the base never drew, which is what personalised styles need
    eval   generate from seeded in-distribution prompts and score them with the evaluator

Only base subjects and styles are used: the held-out ones stay unseen (the decoder stage's generic textures
are not styles of the world and are never the held-out styles' renderer). fp16 weights (EMA for the UNet and text
encoders) go to --out (``assets/mini``, what the app loads) every --checkpoint-minutes; the exact fp32 state
(weights, EMA, optimizer, step) goes to --state (git-ignored). Resuming from --out alone (a fresh clone) works
too, with a fresh optimizer. Every --eval-minutes the EMA model's generations are scored and appended to
``<log>/curve.jsonl``; ``<log>/train.log`` is the human log. Deterministic for a seed: each step's batch,
noise and caption phrasing are drawn from generators seeded with (seed, step).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zipq_mini import concepts, evaluator, pipeline, world

TIME_IDS = (64, 64, 0, 0, 64, 64)  # SDXL add_time_ids: original size, crop top-left, target size
GATE_SEED = 31_337
EVAL_SEED = 4_242


@dataclass
class RecipeConfig:
    """Settings shared by all stages (defaults = the shipped run)."""

    out: str = "assets/mini"  # diffusers folder the app loads
    state: str = "runs/mini_state"  # resumable fp32 state (git-ignored)
    log: str = "scripts/mini_log"  # curve.jsonl, train.log, vae_gate.json
    data: str = "runs/data/base.npz"  # rendered base-world training images (made when missing)
    n_data: int = 30_000
    data_seed: int = 2001
    seed: int = 0
    threads: int = 1
    batch: int = 32
    lr: float = 6e-4
    warmup: int = 200
    max_steps: int = 10**9
    max_minutes: float = 1e9
    checkpoint_minutes: float = 15.0
    eval_minutes: float = 15.0
    eval_n: int = 64
    eval_steps: int = 20
    guidance: float = 5.0
    gate_n: int = 1000
    gate: float = 0.95
    ema_decay: float = 0.998
    drop_caption: float = 0.1
    kl_weight: float = 1e-6
    feat_weight: float = 0.5
    generic_share: float = 0.5  # decoder stage: share of each batch drawn in generic textures
    family_share: float = 0.0  # unet and decoder stages: share of each batch from the concept family (0 = v1)
    family_data: str = "runs/data/family.npz"  # rendered family images and captions (made when missing)
    n_family: int = 20_000
    family_seed: int = 3001
    evaluator: str | None = None  # None = assets/evaluator
    force: bool = False  # unet: start even when the VAE gate has not passed
    render_workers: int = 1  # processes that render missing training data (any count: the same images)
    device: str = "cpu"  # unet: where the UNet and text encoders train ("cuda" on a GPU machine)
    unet_channels: str = ""  # unet: block widths ("64,128,256"); other than --out's UNet: a fresh UNet of them
    stop_when_gated: bool = False  # vae: run the gate at every checkpoint and stop once it passes


# ------------------------------------------------------------------------------------------------ helpers
def log_line(cfg: RecipeConfig, text: str) -> None:
    """Append a line to the human log and print it."""
    Path(cfg.log).mkdir(parents=True, exist_ok=True)
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
    print(line, flush=True)
    with open(Path(cfg.log) / "train.log", "a") as f:
        f.write(line + "\n")


def load_data(cfg: RecipeConfig) -> tuple[np.ndarray, list[world.Scene]]:
    """Base-world images (N, 64, 64, 3) uint8 and their scenes, rendered once and cached in ``cfg.data``."""
    path = Path(cfg.data)
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        imgs = np.load(path)["images"]
        scenes = [world.Scene(**d) for d in json.loads(meta.read_text())]
        if len(imgs) >= cfg.n_data:
            return imgs[: cfg.n_data], scenes[: cfg.n_data]
    imgs, scenes = world.render_dataset(cfg.n_data, cfg.data_seed, held_out=False, workers=cfg.render_workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=imgs, **world.labels(scenes))
    meta.write_text(json.dumps([s.to_dict() for s in scenes]))
    return imgs, scenes


def load_family(cfg: RecipeConfig) -> tuple[np.ndarray, list[str]]:
    """Family images (N, 64, 64, 3) uint8 and their captions (``concepts.render_family_dataset``), cached."""
    path = Path(cfg.family_data)
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        imgs, captions = np.load(path)["images"], json.loads(meta.read_text())
        if len(imgs) >= cfg.n_family:
            return imgs[: cfg.n_family], captions[: cfg.n_family]
    imgs, captions = concepts.render_family_dataset(cfg.n_family, cfg.family_seed, workers=cfg.render_workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=imgs)
    meta.write_text(json.dumps(captions))
    return imgs, captions


def to_x(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1


def step_rng(cfg: RecipeConfig, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Generators seeded with (seed, stage, step): a resumed run draws exactly what an unbroken one would."""
    rng = np.random.default_rng([cfg.seed, stage, step])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def load_pipeline(cfg: RecipeConfig):
    """The pipeline in ``cfg.out`` (fp32) or, when there is none yet, a fresh random one."""
    if (Path(cfg.out) / "model_index.json").is_file():
        return pipeline.load_mini(cfg.out)
    pipe = pipeline.build_mini_pipeline(cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_state(path: Path, **state) -> None:
    """Atomically write a torch state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def write_progress(cfg: RecipeConfig, stage: str, **info) -> None:
    """Record stage progress next to the weights (``<out>/mini_train.json``): what a fresh clone resumes from."""
    p = Path(cfg.out) / "mini_train.json"
    d = json.loads(p.read_text()) if p.is_file() else {}
    d[stage] = info
    p.write_text(json.dumps(d, indent=1))


def read_progress(cfg: RecipeConfig, stage: str) -> dict:
    p = Path(cfg.out) / "mini_train.json"
    return json.loads(p.read_text()).get(stage, {}) if p.is_file() else {}


# ---------------------------------------------------------------------------------------------------- VAE
def perceptual(ev: evaluator.Evaluator | None, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the evaluator's conv features (what it uses to tell subject/style/colour)."""
    if ev is None:
        return x.new_zeros(())
    with torch.no_grad():
        target = ev.net.stage_features(x)
    return sum(F.mse_loss(a, b) for a, b in zip(ev.net.stage_features(x_hat), target)) / len(target)


def vae_loss(vae, ev, x: torch.Tensor, gen: torch.Generator, cfg: RecipeConfig) -> tuple[torch.Tensor, dict]:
    """Reconstruction loss of one batch x (B, 3, 64, 64)."""
    post = vae.encode(x).latent_dist
    x_hat = vae.decode(post.sample(gen)).sample  # (B, 3, 64, 64)
    l1, l2 = F.l1_loss(x_hat, x), F.mse_loss(x_hat, x)
    feat = perceptual(ev, x_hat, x)
    kl = post.kl().mean()
    loss = l1 + l2 + cfg.feat_weight * feat + cfg.kl_weight * kl
    return loss, {"l1": float(l1.detach()), "feat": float(feat.detach()), "kl": float(kl.detach())}


def load_ev(cfg: RecipeConfig) -> evaluator.Evaluator | None:
    """The evaluator, frozen, or None when no weights exist (tiny test runs)."""
    try:
        ev = evaluator.load_evaluator(cfg.evaluator)
    except Exception:  # noqa: BLE001 - the perceptual term is optional
        return None
    for p in ev.net.parameters():
        p.requires_grad_(False)
    return ev


def set_scaling_factor(vae, imgs: np.ndarray) -> float:
    """Set ``scaling_factor`` = 1 / std of the latents of up to 512 images (unit-variance diffusion inputs)."""
    with torch.no_grad():
        z = torch.cat([vae.encode(to_x(imgs[i:i + 128])).latent_dist.mean for i in range(0, min(512, len(imgs)), 128)])
    sf = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=sf)
    return sf


def autoencoder_batch(cfg: RecipeConfig, imgs: np.ndarray, rng: np.random.Generator, generic: bool,
                      family: np.ndarray | None = None) -> torch.Tensor:
    """A training batch: cached base renders, with ``cfg.generic_share`` of them redrawn in generic textures.

    The generic share (``world.generic_pattern``) only serves the decoder stage: base shapes, colours and
    backgrounds in gratings, plaids, rings and waves of any angle and period, so the decoder learns to draw
    patterns in general instead of the six base textures only. With ``family`` images, ``cfg.family_share``
    of the batch comes from them instead.
    """
    batch = imgs[rng.integers(0, len(imgs), cfg.batch)].copy()
    if generic:
        for i in np.flatnonzero(rng.random(cfg.batch) < cfg.generic_share):
            batch[i] = np.asarray(world.render(world.sample_scene(rng), world.generic_pattern(rng)))
    if family is not None and cfg.family_share > 0:
        k = int(round(cfg.batch * cfg.family_share))
        batch[:k] = family[rng.integers(0, len(family), k)]
    return to_x(batch)


def train_vae(cfg: RecipeConfig, stage: str = "vae"):
    """Generator of step records while training the VAE (stage "vae") or its decoder alone ("decoder").

    The decoder stage freezes the encoder, so the latents, their scaling factor and the UNet trained on them
    stay valid: it can run after the UNet to make the decoder a better image codec (DESIGN §9).
    """
    imgs, _ = load_data(cfg)
    family = load_family(cfg)[0] if cfg.family_share > 0 else None
    pipe = load_pipeline(cfg)
    vae = pipe.vae.float().train()
    decoder_only = stage == "decoder"
    if decoder_only:
        vae.encoder.requires_grad_(False).eval()
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    ev = load_ev(cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    state_path = Path(cfg.state) / f"{stage}.pt"
    step, minutes = read_progress(cfg, stage).get("step", 0), read_progress(cfg, stage).get("minutes", 0.0)
    warm_from = step  # a fresh optimizer warms up again, also when the weights continue a finished run
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        vae.load_state_dict(st["vae"])
        opt.load_state_dict(st["opt"])
        step, minutes = st["step"], st["minutes"]
        warm_from = st.get("warm_from", 0)
    t0, last_ckpt = time.time() - minutes * 60, time.time()

    def checkpoint() -> None:
        vae.eval()
        if not decoder_only:
            set_scaling_factor(vae, imgs)
        pipeline.save_mini(pipe, cfg.out)
        m = (time.time() - t0) / 60
        write_progress(cfg, stage, step=step, minutes=m)
        save_state(state_path, vae=vae.state_dict(), opt=opt.state_dict(), step=step, minutes=m, warm_from=warm_from)
        vae.train()
        if decoder_only:
            vae.encoder.eval()

    start = step
    while step < cfg.max_steps and (time.time() - t0) / 60 < cfg.max_minutes:
        rng, gen = step_rng(cfg, 2 if decoder_only else 0, step)
        x = autoencoder_batch(cfg, imgs, rng, generic=decoder_only, family=family)
        loss, parts = vae_loss(vae, ev, x, gen, cfg)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step - warm_from + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        yield {"stage": stage, "step": step, "loss": float(loss.detach()), **parts,
               "minutes": (time.time() - t0) / 60}
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
            if cfg.stop_when_gated and not decoder_only:
                gate = run_gate(cfg, vae.eval())
                vae.train()
                yield {"stage": stage, "step": step, "gate": gate}
                if gate["passed"]:
                    return
    if step > start or not (Path(cfg.out) / "model_index.json").is_file():
        checkpoint()
    yield {"stage": stage, "step": step, "gate": run_gate(cfg, vae.eval())}


def run_gate(cfg: RecipeConfig, vae=None) -> dict:
    """Evaluator accuracy on VAE reconstructions of fresh base renders (and, for information, held-out ones).

    Writes ``<log>/vae_gate.json``; ``passed`` is True when subject, style and colour all reach ``cfg.gate``.
    """
    vae = vae if vae is not None else load_pipeline(cfg).vae.float().eval()
    ev = evaluator.load_evaluator(cfg.evaluator)
    res: dict = {}
    for name, held in (("base", False), ("heldout", True)):
        n = cfg.gate_n if held is False else max(2, cfg.gate_n // 2)
        imgs, scenes = world.render_dataset(n, GATE_SEED + int(held), held)
        with torch.no_grad():
            rec = torch.cat([vae.decode(vae.encode(to_x(imgs[i:i + 100])).latent_dist.mean).sample
                             for i in range(0, n, 100)])
        rec01 = ((rec.clamp(-1, 1) + 1) / 2)  # (n, 3, 64, 64)
        psnr = float(-10 * torch.log10(F.mse_loss(rec01, (to_x(imgs) + 1) / 2)))
        acc = evaluator.accuracy(ev, rec01, {k: v for k, v in world.labels(scenes).items() if k != "background"})
        clean = evaluator.accuracy(ev, imgs, {k: v for k, v in world.labels(scenes).items() if k != "background"})
        res[name] = {"n": n, "psnr": psnr, "recon_acc": acc, "clean_acc": clean}
    res["passed"] = bool(min(res["base"]["recon_acc"].values()) >= cfg.gate)
    res["threshold"] = cfg.gate
    Path(cfg.log).mkdir(parents=True, exist_ok=True)
    (Path(cfg.log) / "vae_gate.json").write_text(json.dumps(res, indent=1))
    return res


# --------------------------------------------------------------------------------------------------- UNet
def encode_dataset(cfg: RecipeConfig, vae, imgs: np.ndarray, name: str = "latents"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (N, C, 16, 16), cached in the state folder as ``name``.

    The cache is keyed by the VAE's weights, so retraining the VAE re-encodes.
    """
    key = float(sum(p.double().sum() for p in vae.parameters()))
    path = Path(cfg.state) / f"{name}.pt"
    if path.is_file():
        d = torch.load(path, weights_only=False)
        if d["key"] == key and len(d["mean"]) >= len(imgs):
            return d["mean"][: len(imgs)].float(), d["std"][: len(imgs)].float()
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(imgs), 256):
            post = vae.encode(to_x(imgs[i:i + 256]).to(vae.device)).latent_dist
            means.append(post.mean.half().cpu())
            stds.append(post.std.half().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    save_state(path, key=key, mean=mean, std=std)
    return mean.float(), std.float()


def encode_text(pipe, te1, te2, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning: (B, 77, 2*width) penultimate hidden states of both encoders, (B, proj) pooled."""
    kw = dict(padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    ids1 = pipe.tokenizer(captions, **kw).input_ids.to(te1.device)
    ids2 = pipe.tokenizer_2(captions, **kw).input_ids.to(te2.device)
    o1 = te1(ids1, output_hidden_states=True)
    o2 = te2(ids2, output_hidden_states=True)
    # The pipeline uses hidden_states[-2] of both encoders and text_embeds (pooled + projected) of the second.
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2.text_embeds


class Ema:
    """Exponential moving average of a module's parameters (decay warmed up as (1 + n) / (10 + n))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)


def min_snr_weights(sched, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR (Hang et al. 2023)."""
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


def unet_loss(cfg, pipe, unet, te1, te2, sched, lat, scenes, rng, gen, family=None) -> torch.Tensor:
    """Denoising loss of one batch drawn with ``rng`` / ``gen``.

    ``family`` = (latents, captions) of the concept family: ``cfg.family_share`` of the batch comes from it.
    """
    mean, std = lat
    k = int(round(cfg.batch * cfg.family_share)) if family is not None else 0
    idx = rng.integers(0, len(mean), cfg.batch - k)
    mean, std = mean[idx], std[idx]
    captions = [world.caption(scenes[i], rng) for i in idx]
    if k:
        (f_mean, f_std), f_captions = family
        f_idx = rng.integers(0, len(f_mean), k)
        mean, std = torch.cat([mean, f_mean[f_idx]]), torch.cat([std, f_std[f_idx]])
        captions += [f_captions[i] for i in f_idx]
    sf = pipe.vae.config.scaling_factor
    z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * sf  # (B, C, 16, 16)
    emb, pooled = encode_text(pipe, te1, te2, captions)
    keep = torch.from_numpy(rng.random(cfg.batch) >= cfg.drop_caption).float()  # (B,)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
    noisy = sched.add_noise(z0, noise, t)  # every draw on the CPU, so a run is the same batch for batch anywhere
    weights = min_snr_weights(sched, t)  # from the CPU's schedule, before t moves (no device round trip)
    dev = emb.device
    keep, noise, t, noisy, weights = keep.to(dev), noise.to(dev), t.to(dev), noisy.to(dev), weights.to(dev)
    emb, pooled = emb * keep[:, None, None], pooled * keep[:, None]
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32, device=dev).repeat(cfg.batch, 1)
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    pred = unet(noisy, t, encoder_hidden_states=emb, added_cond_kwargs=cond).sample  # (B, C, 16, 16)
    per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per * weights).mean()


def ema_pipeline(pipe, emas: dict[str, Ema]):
    """A pipeline that shares the VAE and tokenizers but uses the EMA text encoders and UNet."""
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=emas["text_encoder"].module,
                                  text_encoder_2=emas["text_encoder_2"].module, tokenizer=pipe.tokenizer,
                                  tokenizer_2=pipe.tokenizer_2, unet=emas["unet"].module, scheduler=pipe.scheduler,
                                  force_zeros_for_empty_prompt=True, add_watermarker=False)
    p.set_progress_bar_config(disable=True)
    return p


def eval_generations(cfg: RecipeConfig, pipe) -> dict:
    """Evaluator accuracy (subject, style, colour) of generations from seeded in-distribution prompts."""
    return evaluator.generation_quality(pipe, n=cfg.eval_n, seed=EVAL_SEED, steps=cfg.eval_steps,
                                        guidance=cfg.guidance, evaluator=evaluator.load_evaluator(cfg.evaluator))


def widen(pipe, cfg: RecipeConfig) -> bool:
    """With --unet-channels other than the UNet's own widths: a fresh UNet of those widths (seeded), trained from
    step 0 on the VAE and text encoders already in --out. Once checkpointed, --out holds it and a run resumes it."""
    if not cfg.unet_channels:
        return False
    widths = tuple(int(w) for w in cfg.unet_channels.split(","))
    if widths == tuple(pipe.unet.config.block_out_channels):
        return False
    if (Path(cfg.state) / "unet.pt").is_file():
        raise SystemExit(f"{cfg.state} holds the state of a UNet of other widths: give the new UNet a fresh --state.")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.seed)
    pipe.unet = UNet2DConditionModel(**pipeline.unet_config(pipeline.MiniConfig(unet_channels=widths)))
    return True


def train_unet(cfg: RecipeConfig):
    """Generator of step records while training the text encoders and UNet jointly."""
    from diffusers import DDPMScheduler

    gate = Path(cfg.log) / "vae_gate.json"
    if not cfg.force and not (gate.is_file() and json.loads(gate.read_text()).get("passed")):
        raise SystemExit(f"The VAE gate has not passed ({gate}); run the vae / gate stage first (or --force).")
    imgs, scenes = load_data(cfg)
    pipe = load_pipeline(cfg)
    fresh = widen(pipe, cfg)
    dev = torch.device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls on a GPU (nothing on a CPU)
    pipe.to(dev)
    pipe.vae.float().eval().requires_grad_(False)
    lat = encode_dataset(cfg, pipe.vae, imgs)
    del imgs
    family = None
    if cfg.family_share > 0:
        f_imgs, f_captions = load_family(cfg)
        family = (encode_dataset(cfg, pipe.vae, f_imgs, "family_latents"), f_captions)
    sched = DDPMScheduler(**pipeline.scheduler_config(pipeline.MiniConfig()))
    mods = {"unet": pipe.unet.float().train(), "text_encoder": pipe.text_encoder.float().train(),
            "text_encoder_2": pipe.text_encoder_2.float().train()}
    params = [p for m in mods.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    prog = {} if fresh else read_progress(cfg, "unet")
    step, minutes = prog.get("step", 0), prog.get("minutes", 0.0)
    warm_from = step  # a fresh optimizer warms up again, also when the weights continue a finished run
    state_path = Path(cfg.state) / "unet.pt"
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False, map_location=dev)
        for k, m in mods.items():
            m.load_state_dict(st[k])
        opt.load_state_dict(st["opt"])
        step, minutes = st["step"], st["minutes"]
        warm_from = st.get("warm_from", 0)
    emas = {k: Ema(m, cfg.ema_decay) for k, m in mods.items()}  # the committed fp16 weights are EMA weights
    if state_path.is_file():
        for k, e in emas.items():
            e.module.load_state_dict(st["ema_" + k])
    t0, last_ckpt, last_eval = time.time() - minutes * 60, time.time(), time.time()

    def checkpoint() -> None:
        m = (time.time() - t0) / 60
        pipeline.save_mini(ema_pipeline(pipe, emas), cfg.out)
        write_progress(cfg, "unet", step=step, minutes=m)
        save_state(state_path, step=step, minutes=m, opt=opt.state_dict(), warm_from=warm_from,
                   **{k: mod.state_dict() for k, mod in mods.items()},
                   **{"ema_" + k: e.module.state_dict() for k, e in emas.items()})

    def evaluate_now() -> dict:
        r = eval_generations(cfg, ema_pipeline(pipe, emas))
        rec = {"step": step, "minutes": round((time.time() - t0) / 60, 2),
               **{k: v for k, v in r.items() if k.endswith("acc") or k == "sec_per_image"}}
        with open(Path(cfg.log) / "curve.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        grid = r["images"][:16]
        sheet = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (64 * len(grid), 64))
        for i, im in enumerate(grid):
            sheet.paste(im, (64 * i, 0))
        sheet.save(Path(cfg.log) / "latest_samples.png")
        return rec

    Path(cfg.log).mkdir(parents=True, exist_ok=True)
    start = step
    while step < cfg.max_steps and (time.time() - t0) / 60 < cfg.max_minutes:
        rng, gen = step_rng(cfg, 1, step)
        loss = unet_loss(cfg, pipe, mods["unet"], mods["text_encoder"], mods["text_encoder_2"], sched, lat, scenes,
                         rng, gen, family)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step - warm_from + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, e in emas.items():
            e.update(mods[k], step)
        step += 1
        yield {"stage": "unet", "step": step, "loss": float(loss.detach()), "minutes": (time.time() - t0) / 60}
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
        if time.time() - last_eval > cfg.eval_minutes * 60:
            yield {"stage": "unet", "step": step, "eval": evaluate_now()}
            last_eval = time.time()
    if step > start:
        checkpoint()
        yield {"stage": "unet", "step": step, "eval": evaluate_now()}


# ---------------------------------------------------------------------------------------------------- CLI
def run(stage: str, cfg: RecipeConfig, log_every: int = 50) -> list[dict]:
    """Run one stage, logging every ``log_every`` steps; returns the non-step records (gate, evals)."""
    torch.set_num_threads(cfg.threads)
    log_line(cfg, f"start {stage} {json.dumps(asdict(cfg))}")
    if stage == "gate":
        res = run_gate(cfg)
        log_line(cfg, f"gate {json.dumps(res)}")
        return [res]
    if stage == "eval":
        r = eval_generations(cfg, load_pipeline(cfg))
        r = {k: v for k, v in r.items() if k not in ("images", "prompts")}
        log_line(cfg, f"eval {json.dumps(r)}")
        return [r]
    gen = train_unet(cfg) if stage == "unet" else train_vae(cfg, stage)
    out, acc, n = [], 0.0, 0
    for rec in gen:
        if "loss" in rec:
            acc, n = acc + rec["loss"], n + 1
            if rec["step"] % log_every == 0:
                log_line(cfg, f"{stage} step {rec['step']} loss {acc / n:.4f} min {rec['minutes']:.1f}"
                         + (f" l1 {rec['l1']:.4f} feat {rec['feat']:.4f}" if "l1" in rec else ""))
                acc, n = 0.0, 0
        else:
            out.append(rec)
            log_line(cfg, f"{stage} {json.dumps({k: v for k, v in rec.items() if k != 'stage'})}")
    return out


def parse_args(argv: list[str] | None = None) -> tuple[str, RecipeConfig, int]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["vae", "gate", "unet", "decoder", "eval"])
    for k, v in asdict(RecipeConfig()).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=type(v) if v is not None else str, default=v)
    ap.add_argument("--log-every", type=int, default=50)
    a = vars(ap.parse_args(argv))
    stage, log_every = a.pop("stage"), a.pop("log_every")
    return stage, RecipeConfig(**a), log_every


def main(argv: list[str] | None = None) -> list[dict]:
    stage, cfg, log_every = parse_args(argv)
    return run(stage, cfg, log_every)


if __name__ == "__main__":
    main()
