"""Personalisation on unseen concepts (issue 19, deliverable 4): does one adapter learn a split's concept?

Concepts come from ``zipq_mini.concepts`` (``split("tuning")`` to choose a recipe on, ``split("test")`` only ever
scored), scored by the label-free judge (``zipq_mini.judge``): identification = the nearest reference centroid
(16 clean renders per concept, ``reference_images(c, 16, seed=0)``) among the split's concepts of that kind;
similarity = mean cosine of an image's embedding to its own concept's references.

Three stages:

- ``--stage bounds``: what no adapter can beat. Per concept, judge identification of (a) clean renders of
  generation-like scenes, (b) the same renders through mini's VAE (encode → decode: what the latent can carry),
  (c) mini with no adapter from the concept's prompts (the floor: the base does not know the token).
- ``--stage vae_sweep``: styles drawn fresh from the texture family (neither split), per kind and period band:
  judge similarity and identification of clean renders and of their VAE round trips.
- ``--stage recipe``: per concept, write its example set (5 subject / 3 style images with caption sidecars), train
  one DoRA with mini's family defaults and the ``--recipe`` overrides, generate ``--images`` from the concept's
  prompts, record identification, similarity and seconds.

Prompts (two groups of ``--images``/2, a colour and background per group drawn per concept): a subject
"a photo of a {colour} sks shape on a {background} background"; a style "a {colour} {noun} on a {background}
background in zkz style" with a world subject. ``--captions plain`` drops the sidecars (every image gets the
instance prompt). Each run is stored under ``runs.<label>`` of ``--out`` (the file accumulates runs; a run is
rewritten after every concept, ``status`` "partial" until it ends). ``--adapters DIR`` keeps the trained adapters
(per recipe, captions and seed) so that generation-only variants (``--candidates``, prompts) skip training.

    python bench/personalization_split.py --stage bounds --split tuning --out bench/results/personalization_split.json
    python bench/personalization_split.py --split tuning --kinds style --recipe steps=600,learning_rate=1e-3 \
        --label style_600_1e-3 --out bench/results/personalization_split.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

from common import (
    concept_config,
    concept_images,
    concept_references,
    concept_token,
    emit_json,
    load_mini_base,
    train_concept_adapter,
)

import numpy as np
import torch

from zipq_core import GenerateConfig, generate, load_adapter
from zipq_core.config import parse_targets
from zipq_core.train.loop import lr_factor
from zipq_mini import concepts, judge, world

GROUPS = 2  # prompts per concept (a colour and background each)
INT_KEYS = {"steps", "rank", "batch_size", "warmup_steps", "num_class_images"}
FLOAT_KEYS = {"learning_rate", "alpha", "prior_weight"}
BOOL_KEYS = {"flip", "prior_preservation"}


def parse_recipe(text: str) -> dict:
    """``key=value,…`` TrainConfig overrides (targets=<preset or a+b+c>) → keyword arguments."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key == "targets":
            out["target_modules"] = parse_targets(value.replace("/", ","))
        elif key in INT_KEYS:
            out[key] = int(value)
        elif key in FLOAT_KEYS:
            out[key] = float(value)
        elif key in BOOL_KEYS:
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = value
    return out


def group_of(kind: str) -> str:
    return "subjects" if kind == "subject" else "styles"


SUBJECT_PROMPT = "a photo of a {colour} sks shape on a {background} background"
STYLE_PROMPT = "{article} {colour} {noun} on a {background} background in zkz style"


def prompts(c, seed: int, subject_prompt: str = SUBJECT_PROMPT, style_prompt: str = STYLE_PROMPT) -> list[str]:
    """The concept's GROUPS prompts (colour, background and, for a style, a world subject drawn per concept)."""
    rng = np.random.default_rng([seed, 31, zlib.crc32(c.name.encode())])
    out = []
    for _ in range(GROUPS):
        colour = str(rng.choice(world.COLOUR_NAMES))
        background = str(rng.choice([b for b in world.BACKGROUND_NAMES if b != "white" or colour != "yellow"]))
        noun = world.SUBJECT_WORDS[str(rng.choice(world.SUBJECTS))][0]
        template = subject_prompt if isinstance(c, concepts.SubjectConcept) else style_prompt
        out.append(template.format(colour=colour, background=background, noun=noun,
                                   article="an" if colour[0] in "aeiou" else "a"))
    return out


def score(j: judge.Judge, images, c, kind: str, refs: dict[str, np.ndarray]) -> dict:
    """Identification rate and mean similarity to the concept's references."""
    emb = j.embed(images, kind)
    names = judge.identify(emb, refs)
    return {"id": round(sum(n == c.name for n in names) / len(names), 4),
            "similarity": round(float((emb @ refs[c.name].T).mean()), 4),
            "confused_with": sorted({n for n in names if n != c.name})}


def clean_renders(c, n: int, seed: int) -> list:
    """Renders of the concept in scenes like its prompts' (random colour/background; styles on world subjects)."""
    rng = np.random.default_rng([seed, 53, zlib.crc32(c.name.encode())])
    if isinstance(c, concepts.SubjectConcept):
        fills = [f for f in world.STYLES if f != "outline"]  # as the references: identity is the silhouette
        return [concepts.render_concepts(concepts.random_scene(rng, style=str(rng.choice(fills))), subject=c)
                for _ in range(n)]
    return [concepts.render_concepts(concepts.random_scene(rng, subject=str(rng.choice(world.SUBJECTS))), style=c)
            for _ in range(n)]


@torch.no_grad()
def vae_roundtrip(base, images: list) -> list:
    """Encode → decode through the base's VAE (the latent's mode): what any adapter's output is limited to."""
    from PIL import Image

    vae = base.pipe.vae
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images]))
    x = (x.permute(0, 3, 1, 2) / 127.5 - 1.0).to(base.device, base.dtype)
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    arr = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def sample(base, c, adapters, args) -> list:
    """``args.images`` images of the concept's prompts, ``args.candidates`` per image."""
    out, images, seed, candidates = [], args.images, args.seed, args.candidates
    per = -(-images // GROUPS)
    for k, prompt in enumerate(prompts(c, seed, args.subject_prompt, args.style_prompt)):
        cfg = GenerateConfig(prompt=prompt, seed=1000 * seed + k, steps=20, num_images=min(per, images - k * per),
                             candidates=candidates)
        out += generate(base, cfg, adapters)
    return out


def bounds(base, j: judge.Judge, split_name: str, kinds: list[str], args) -> dict:
    """Stage 1: clean renders, through the VAE, and the base without an adapter, per concept."""
    s = concepts.split(split_name)
    out: dict = {}
    for kind in kinds:
        refs = concept_references(j, split_name, kind)
        rows = {}
        for c in s.subjects if kind == "subject" else s.styles:
            clean = clean_renders(c, args.images, args.seed)
            rows[c.name] = {"clean": score(j, clean, c, kind, refs),
                            "vae": score(j, vae_roundtrip(base, clean), c, kind, refs),
                            "base": score(j, sample(base, c, [], args), c, kind, refs),
                            "kind": getattr(c, "kind", "")}
        out[group_of(kind)] = rows
        for row in ("clean", "vae", "base"):
            out[f"{kind}_{row}_id"] = round(statistics.fmean(r[row]["id"] for r in rows.values()), 4)
    return out


def vae_sweep(base, j: judge.Judge, args) -> dict:
    """Which textures mini's VAE carries: per texture kind and period band, ``--sweep`` styles drawn fresh from the
    family (seed 4242, neither split), 4 references and 4 renders each on large world subjects. Per band: the mean
    judge similarity of the renders to their references, clean and through the VAE, and identification among
    every drawn style (all kinds and bands: harder than a split's 4 or 6) clean and through the VAE."""
    rng = np.random.default_rng(4242)
    bands = [(6.0, 8.0), (8.0, 10.0), (10.0, 12.0)]
    drawn = []  # (kind, band, reference embeddings, clean embeddings, VAE embeddings)
    for kind in concepts.TEXTURE_KINDS:
        for low, high in bands:
            for i in range(args.sweep):
                style = dataclasses.replace(concepts.random_style(rng, f"sweep_{kind}_{i}", kind),
                                            period=float(rng.uniform(low, high)))
                clean = clean_renders(style, 4, i)
                drawn.append((kind, f"{low:g}-{high:g}", j.embed(clean_renders(style, 4, 100 + i), "style"),
                              j.embed(clean, "style"), j.embed(vae_roundtrip(base, clean), "style")))
    _, cents = judge.centroids({str(i): d[2] for i, d in enumerate(drawn)})
    out: dict = {}
    for i, (kind, band, refs, clean, vae) in enumerate(drawn):
        row = out.setdefault(kind, {}).setdefault(band, {"sim_clean": [], "sim_vae": [], "id_clean": [],
                                                         "id_vae": []})
        for name, e in (("clean", clean), ("vae", vae)):
            row[f"sim_{name}"].append(float((e @ refs.T).mean()))
            row[f"id_{name}"] += [float(x) for x in ((e @ cents.T).argmax(axis=1) == i)]
    return {kind: {band: {k: round(statistics.fmean(v), 3) for k, v in row.items()} for band, row in bands_.items()}
            for kind, bands_ in out.items()}


def token_vectors(base, token: str) -> list[tuple[torch.nn.Embedding, list[int]]]:
    """Each text encoder's token-embedding table with the ids the token's word is split into (BPE pieces)."""
    pipe = base.pipe
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    return [(enc.get_input_embeddings(), tok(token, add_special_tokens=False).input_ids)
            for tok, enc in pairs if enc is not None]


@contextmanager
def token_embedding(base, token: str, learned: list[torch.Tensor] | None):
    """The token's pieces carry the `learned` vectors (one [pieces, D] per text encoder) inside the block; the
    tables are put back as they were after it. None: nothing changes."""
    tables = token_vectors(base, token)
    saved = [table.weight.data[ids].clone() for table, ids in tables]
    try:
        if learned is not None:
            for (table, ids), vectors in zip(tables, learned):
                table.weight.data[ids] = vectors.to(table.weight.dtype)
        yield
    finally:
        for (table, ids), old in zip(tables, saved):
            table.weight.data[ids] = old


def dreambooth_loss(base, kind: str, folder: Path, seed: int, **recipe):
    """The training loop's DreamBooth loss on a concept's example set (its captions, mirrors, size conditioning,
    timestep draw and the recipe's bias): each call draws a batch and returns its loss, with gradient."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from zipq_core.encode import Conditioning, encode_images, encode_text, sample_latents
    from zipq_core.train.loop import prediction

    cfg = concept_config(kind, **recipe)
    data = concept_images(folder, cfg)
    views = [t.image for t in data.images]
    captions = [t.caption for t in data.images] * 2  # the mirrors after the images, as the training loop
    moments = torch.cat([encode_images(base, views), encode_images(base, views, flip=True)])
    size_ids = encode_text(base, captions[:1], cfg.resolution).time_ids  # SDXL's size conditioning, one row
    scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)

    def loss() -> torch.Tensor:
        index = torch.randint(0, len(captions), (cfg.batch_size,), generator=generator)
        latents = sample_latents(moments[index], base, generator)
        hidden, _, pooled, _ = base.pipe.encode_prompt(prompt=[captions[i] for i in index], device=base.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        cond = Conditioning(hidden, pooled, size_ids.expand(len(index), -1))
        return F.mse_loss(*prediction(base, base.unet, scheduler, latents, cond, cfg.noise_bias, generator))
    return loss


def learn_token(base, kind: str, folder: Path, steps: int, lr: float, seed: int) -> list[torch.Tensor]:
    """Textual inversion of the concept's token on its example set (the first stage of two-stage pivotal tuning):
    only the rows of the token's BPE pieces in both text encoders move, the UNet has no adapter; the DreamBooth
    loss of the training loop (same captions, mirrors, timestep draw). Returns the learned rows per encoder."""
    loss = dreambooth_loss(base, kind, folder, seed)
    tables = token_vectors(base, concept_token(kind))
    rows = [table.weight.data[ids].clone().requires_grad_(True) for table, ids in tables]
    optimizer = torch.optim.AdamW(rows, lr=lr, weight_decay=0.0)
    hooks = [table.register_forward_hook(_splice(ids, row)) for (table, ids), row in zip(tables, rows)]
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
    return [row.detach().clone() for row in rows]


@contextmanager
def unet_weights(base, state: dict | None = None):
    """The UNet's weights are put back as they were after the block, whatever it did to them; `state`, when given,
    is loaded for the block."""
    saved = {k: v.clone() for k, v in base.unet.state_dict().items()}
    try:
        if state is not None:
            base.unet.load_state_dict(state)
        yield
    finally:
        base.unet.load_state_dict(saved)


def finetune_unet(base, kind: str, folder: Path, seed: int, **recipe) -> dict:
    """Every weight of the UNet trained on the concept's example set, no adapter (``--whole-unet``): what an
    adapter without a rank or target limit could reach with the same loss, batches, steps, learning rate (AdamW,
    constant or cosine) and timestep bias. Returns the trained weights; the base's own are put back."""
    cfg = concept_config(kind, **recipe)
    loss = dreambooth_loss(base, kind, folder, seed, **recipe)
    unet = base.unet
    with unet_weights(base):
        unet.requires_grad_(True).train()
        try:
            optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
            for _ in range(cfg.steps):
                optimizer.zero_grad()
                loss().backward()
                optimizer.step()
                schedule.step()
            return {k: v.detach().clone() for k, v in unet.state_dict().items()}
        finally:
            unet.requires_grad_(False).eval()


def _splice(ids: list[int], row: torch.Tensor):
    """A forward hook on an embedding table: the outputs of the token's piece ids become `row`'s (with gradient)."""
    def hook(module, inputs, output):
        (input_ids,) = inputs
        out = output.clone()
        for piece, vector in zip(ids, row):
            out[input_ids == piece] = vector.to(out.dtype)
        return out
    return hook


def train_one(base, c, kind: str, recipe: dict, args, work: Path) -> tuple[Path, list[torch.Tensor] | None]:
    """One DoRA on the concept's example set, mini's family defaults then the recipe's overrides, after
    ``--ti-steps`` of textual inversion of its token when asked (the DoRA then trains on the learned token);
    reused when ``work`` already holds it (``--adapters``: generation-only variants skip training)."""
    out, vectors_file = work / "adapter", work / "token.pt"
    if (work / "done").is_file():
        return out, torch.load(vectors_file) if vectors_file.is_file() else None
    folder = concepts.write_example_set(c, work / "examples", args.seed)
    if args.captions == "plain":
        for txt in folder.glob("*.txt"):
            txt.unlink()
    if args.whole_unet:
        out = work / "unet.pt"
        torch.save(finetune_unet(base, kind, folder, args.seed, **recipe), out)
        (work / "done").write_text("")
        return out, None
    learned = None
    if args.ti_steps:
        learned = learn_token(base, kind, folder, args.ti_steps, args.ti_lr, args.seed)
        torch.save(learned, vectors_file)
    with token_embedding(base, concept_token(kind), learned):
        train_concept_adapter(base, kind, folder, out, marker=work / "done",
                              **{"method": "dora", "seed": args.seed, **recipe})
    return out, learned


def recipe_run(base, j: judge.Judge, split_name: str, kinds: list[str], names: set[str], args, save) -> dict:
    """Stage 2/3/4: train, generate and score every chosen concept of the split; ``save(run)`` after each."""
    recipe = parse_recipe(args.recipe)
    s = concepts.split(split_name)
    out: dict = {"recipe": args.recipe or "(mini family defaults)", "captions": args.captions,
                 **({"ti_steps": args.ti_steps, "ti_lr": args.ti_lr} if args.ti_steps else {}),
                 **({"whole_unet": True} if args.whole_unet else {}),
                 "candidates": args.candidates, "split": split_name, "images": args.images,
                 "subject_prompt": args.subject_prompt, "style_prompt": args.style_prompt, "status": "partial"}
    pivotal = f"_ti{args.ti_steps}_{args.ti_lr}" if args.ti_steps else "_whole" if args.whole_unet else ""
    slug = "".join(ch if ch.isalnum() or ch in "=.-" else "_"
                   for ch in f"{args.recipe}_{args.captions}_{args.seed}{pivotal}")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = (args.adapters or Path(tmp)) / slug
        for kind in kinds:
            refs = concept_references(j, split_name, kind)
            rows = {}
            for c in s.subjects if kind == "subject" else s.styles:
                if names and c.name not in names:
                    continue
                started = time.time()
                adapter, learned = train_one(base, c, kind, recipe, args, adapters / c.name)
                trained = time.time() - started
                if args.whole_unet:  # the trained UNet itself, no adapter
                    with unet_weights(base, torch.load(adapter)):
                        images = sample(base, c, [], args)
                else:
                    with token_embedding(base, concept_token(kind), learned):
                        images = sample(base, c, [(load_adapter(adapter), args.strength)], args)
                rows[c.name] = {**score(j, images, c, kind, refs), "kind": getattr(c, "kind", ""),
                                "train_s": round(trained, 1), "total_s": round(time.time() - started, 1)}
                print(f"{c.name}: {rows[c.name]}", file=sys.stderr, flush=True)
                if args.save_images:
                    args.save_images.mkdir(parents=True, exist_ok=True)
                    np.save(args.save_images / f"{args.label}__{c.name}.npy",
                            np.stack([np.asarray(im.convert("RGB")) for im in images]))
                out[group_of(kind)] = rows
                save(out)
            if rows:
                out[f"{kind}_id"] = round(statistics.fmean(r["id"] for r in rows.values()), 4)
                out[f"{kind}_similarity"] = round(statistics.fmean(r["similarity"] for r in rows.values()), 4)
    out["status"] = "done"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["bounds", "recipe", "vae_sweep"], default="recipe")
    parser.add_argument("--split", choices=list(concepts.SPLIT_SEEDS), default="tuning")
    parser.add_argument("--kinds", default="subject,style", help="subject, style or both")
    parser.add_argument("--concepts", default="", help="comma-separated concept names (default: the whole split)")
    parser.add_argument("--recipe", default="", help="TrainConfig overrides: steps=600,learning_rate=1e-3,rank=16,"
                                                     "timestep_bias=uniform,target_blocks=all,targets=to_q/to_k")
    parser.add_argument("--captions", choices=["sidecar", "plain"], default="sidecar")
    parser.add_argument("--ti-steps", type=int, default=0, help="textual inversion of the token before the DoRA "
                                                                 "(two-stage pivotal tuning); 0: none")
    parser.add_argument("--ti-lr", type=float, default=5e-3)
    parser.add_argument("--whole-unet", action="store_true", help="a diagnostic: train every UNet weight (no "
                        "adapter) with the recipe's steps, learning rate, schedule and timestep bias")
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", type=int, default=4, help="vae_sweep: styles per texture kind and period band")
    parser.add_argument("--label", default="", help="key of this run under runs (default: split + recipe)")
    parser.add_argument("--subject-prompt", default=SUBJECT_PROMPT, help="template: {colour} {background}")
    parser.add_argument("--style-prompt", default=STYLE_PROMPT, help="template: {article} {colour} {noun} "
                                                                     "{background}")
    parser.add_argument("--adapters", type=Path, default=None, help="keep trained adapters here and reuse them")
    parser.add_argument("--save-images", type=Path, default=None)
    parser.add_argument("--mini", type=Path, default=None, help="a candidate mini's diffusers folder (default: "
                                                                 "assets/mini)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.whole_unet and args.ti_steps:
        parser.error("--whole-unet trains the UNet itself, with no adapter to pair an inverted token with: drop "
                     "--ti-steps")
    args.label = args.label or f"{args.split}:{args.recipe or 'defaults'}:{args.captions}:k{args.candidates}"
    torch.set_grad_enabled(True)
    base, j = load_mini_base(args.mini), judge.load_judge()
    kinds = [k for k in args.kinds.split(",") if k]
    started = time.time()
    command = " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "out")

    def save(run: dict, final: bool = False) -> None:
        """Store the run under its label in --out (re-read first: runs accumulate), JSON on stdout when final."""
        run = {**run, "seconds": round(time.time() - started, 1), "command": command}
        if not args.out:
            if final:
                emit_json(run, None)
            return
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        key, label = {"bounds": ("bounds", args.split), "vae_sweep": ("vae_sweep", "family")}.get(
            args.stage, ("runs", args.label))
        result.setdefault(key, {})[label] = run
        if final:
            emit_json(result, args.out)
        else:
            args.out.write_text(json.dumps(result, indent=2, default=str))

    if args.stage == "bounds":
        run = bounds(base, j, args.split, kinds, args)
    elif args.stage == "vae_sweep":
        run = vae_sweep(base, j, args)
    else:
        run = recipe_run(base, j, args.split, kinds, {n for n in args.concepts.split(",") if n}, args, save)
    save(run, final=True)


if __name__ == "__main__":
    main()
