"""The offline evaluator: how well generated images show a subject, a style and what a prompt asked for.

A small CNN trained on rendered ground truth of the procedural world (``zipq_mini.world``, every subject and
style including the held-out ones, recipe ``scripts/train_evaluator.py``, weights in ``assets/evaluator``)
has one head per attribute (subject, style, colour, background). Each head has its own embedding layer, so
"subject similarity" compares shape features and "style similarity" texture features: the offline stand-ins
for DINO (subject) and CLIP-I (style). Metrics:

- ``subject_fidelity`` / ``style_fidelity``: the probability of the reference class, the accuracy (argmax ==
  reference class) and the mean cosine between the head's embeddings of the images and of reference images;
- ``prompt_adherence``: accuracy on the attributes that a prompt names (``world.parse_prompt``);
- ``evaluate_images``: all of the above as one JSON-able dict (what ``python -m zipq_core evaluate`` prints).

For real SDXL work the same numbers have CLIP-I / CLIP-T / DINO counterparts: ``zipq_core.evaluate`` computes
them when those models are available locally (optional; never needed offline).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from zipq_core.errors import ZipqError
from zipq_core.evaluate import Images, as_pil_list

from . import world

EVALUATOR_DIR = Path(__file__).resolve().parent.parent / "assets" / "evaluator"
HEADS = ("subject", "style", "colour", "background")



@dataclass
class EvaluatorConfig:
    """Architecture and class lists of the evaluator (stored as ``config.json`` beside the weights)."""

    widths: tuple[int, ...] = field(default=(16, 32, 64, 128), metadata={"help": "Channels per conv stage."})
    feature_dim: int = field(default=192, metadata={"help": "Shared feature width."})
    embed_dim: int = field(default=96, metadata={"help": "Per-head embedding width (for cosines)."})
    image_size: int = field(default=64, metadata={"help": "Input side; other sizes are resized."})
    classes: dict[str, list[str]] = field(
        default_factory=lambda: {
            "subject": list(world.ALL_SUBJECTS),
            "style": list(world.ALL_STYLES),
            "colour": list(world.COLOUR_NAMES),
            "background": list(world.BACKGROUND_NAMES),
        },
        metadata={"help": "Class names per head, in logit order."},
    )

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        missing = [h for h in ("subject", "style", "colour") if h not in self.classes]
        if missing:
            raise ValueError(f"EvaluatorConfig.classes lacks heads {missing}; it needs subject, style and colour.")


class EvaluatorNet(nn.Module):
    """Conv trunk -> shared feature -> per-head embedding -> per-head logits."""

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(cfg.widths):  # each stage halves the side: 64 -> 32 -> 16 -> 8 -> 4
            # One conv at full resolution (it dominates the cost), two in the later stages.
            for _ in range(1 if i == 0 else 2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        # Mean and max pooling: position-invariant, but max keeps thin textures (outline, grid) visible.
        self.feature = nn.Sequential(nn.Linear(2 * c_in, cfg.feature_dim), nn.ReLU(inplace=True))
        self.embed = nn.ModuleDict({h: nn.Linear(cfg.feature_dim, cfg.embed_dim) for h in cfg.classes})
        self.heads = nn.ModuleDict({h: nn.Linear(cfg.embed_dim, len(n)) for h, n in cfg.classes.items()})

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after each conv stage, [(B, c, H/2^k, W/2^k)]: a perceptual loss for the mini VAE."""
        feats = []
        for layer in self.trunk:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                feats.append(x)
        return feats

    def embeddings(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-head embeddings (B, embed_dim) of images x (B, 3, H, W) in [-1, 1]."""
        h = self.trunk(x)  # (B, C, 4, 4)
        f = self.feature(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))  # (B, feature_dim)
        return {k: torch.relu(m(f)) for k, m in self.embed.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-head logits (B, n_classes)."""
        return {k: self.heads[k](e) for k, e in self.embeddings(x).items()}


# ---------------------------------------------------------------------------------------------- images
def to_tensor(images: Images, size: int = 64) -> torch.Tensor:
    """Images -> float tensor (B, 3, size, size) in [-1, 1] (larger images are box-filtered down)."""
    pils = [im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BOX if im.width > size
                                                        else Image.Resampling.BICUBIC) for im in as_pil_list(images)]
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in pils])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------- model
class Evaluator:
    """The loaded evaluator: per-image class probabilities and per-head embeddings."""

    def __init__(self, net: EvaluatorNet, cfg: EvaluatorConfig):
        self.net = net.eval()
        self.cfg = cfg

    @property
    def classes(self) -> dict[str, list[str]]:
        """Class names per head."""
        return self.cfg.classes

    @torch.no_grad()
    def _run(self, images: Images, batch_size: int = 256) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        x = to_tensor(images, self.cfg.image_size)
        logits: dict[str, list[torch.Tensor]] = {h: [] for h in self.cfg.classes}
        embs: dict[str, list[torch.Tensor]] = {h: [] for h in self.cfg.classes}
        for i in range(0, len(x), batch_size):
            e = self.net.embeddings(x[i:i + batch_size])
            for h in e:
                embs[h].append(e[h])
                logits[h].append(self.net.heads[h](e[h]))
        return {h: torch.cat(v) for h, v in logits.items()}, {h: torch.cat(v) for h, v in embs.items()}

    def predict(self, images: Images) -> dict[str, np.ndarray]:
        """Class probabilities per head.

        Args:
            images: PIL images, paths, a folder, a uint8 array (B, H, W, 3) or a tensor (B, 3, H, W) in [0, 1].

        Returns:
            ``{head: probs (B, n_classes)}``; class order as in ``self.classes[head]``.
        """
        logits, _ = self._run(images)
        return {h: torch.softmax(v, dim=1).numpy() for h, v in logits.items()}

    def classify(self, images: Images) -> dict[str, list[str]]:
        """The most probable class name per head and image."""
        return {h: [self.classes[h][i] for i in p.argmax(1)] for h, p in self.predict(images).items()}

    def embed(self, images: Images, head: str = "subject") -> np.ndarray:
        """L2-normalised embeddings (B, embed_dim) of one head (``"subject"`` for shape, ``"style"`` for texture).

        Args:
            images: As for ``predict``.
            head: Which head's embedding.

        Returns:
            Unit-norm float32 vectors.
        """
        if head not in self.classes:
            raise ZipqError(f"Unknown evaluator head {head!r}; choose one of {list(self.classes)}.")
        _, embs = self._run(images)
        return torch.nn.functional.normalize(embs[head], dim=1).numpy()


def build_evaluator(cfg: EvaluatorConfig | None = None, seed: int = 0) -> Evaluator:
    """A randomly initialised evaluator (what the recipe trains)."""
    cfg = cfg or EvaluatorConfig()
    torch.manual_seed(seed)
    return Evaluator(EvaluatorNet(cfg), cfg)


def save_evaluator(ev: Evaluator, path: str | Path = EVALUATOR_DIR, fp16: bool = True) -> Path:
    """Write ``model.safetensors`` (fp16 by default) and ``config.json`` into ``path``."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in ev.net.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(ev.cfg), indent=1))
    return out


@lru_cache(maxsize=4)
def _load_cached(path: str) -> Evaluator:
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "model.safetensors").is_file():
        raise ZipqError(f"No evaluator weights in {p}; run scripts/train_evaluator.py or pass the right folder.")
    cfg = EvaluatorConfig(**json.loads((p / "config.json").read_text()))
    net = EvaluatorNet(cfg)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(p / "model.safetensors")).items()}
    net.load_state_dict(sd)
    return Evaluator(net, cfg)


def load_evaluator(path: str | Path | None = None) -> Evaluator:
    """The shipped evaluator (loaded once per path, then cached).

    Args:
        path: Folder with ``model.safetensors`` + ``config.json``; None = ``assets/evaluator``.

    Returns:
        An ``Evaluator`` in eval mode (fp32, CPU).
    """
    return _load_cached(str(Path(path or EVALUATOR_DIR).resolve()))


# --------------------------------------------------------------------------------------------- metrics
def _fidelity(head: str, images: Images, name: str | None, refs: Images | None, ev: Evaluator) -> dict:
    """Probability / accuracy of class ``name`` (inferred from refs when None) and embedding cosine to refs."""
    probs = ev.predict(images)[head]  # (B, n)
    out: dict = {}
    if refs is not None:
        ref_probs = ev.predict(refs)[head]
        if name is None:
            name = ev.classes[head][int(ref_probs.mean(0).argmax())]
        e, r = ev.embed(images, head), ev.embed(refs, head)  # (B, D), (R, D)
        out["cosine"] = float((e @ r.T).mean())
    if name is not None:
        if name not in ev.classes[head]:
            raise ZipqError(f"Unknown {head} {name!r}; the evaluator knows {ev.classes[head]}.")
        k = ev.classes[head].index(name)
        out.update({head: name, "prob": float(probs[:, k].mean()), "acc": float((probs.argmax(1) == k).mean())})
    return out


def subject_fidelity(images: Images, subject: str | None = None, refs: Images | None = None,
                     evaluator: Evaluator | None = None) -> dict:
    """How much the images show the reference subject.

    Args:
        images: Generated images.
        subject: The subject's class name (e.g. "heart"); None = the class the evaluator sees in ``refs``.
        refs: Reference images of the subject (e.g. the training images); gives the embedding cosine.
        evaluator: Defaults to ``load_evaluator()``.

    Returns:
        ``{"subject", "prob", "acc", "cosine"}`` (keys present when computable): mean probability of the subject
        class, fraction of images classified as it, mean cosine of subject embeddings to the references.
    """
    return _fidelity("subject", images, subject, refs, evaluator or load_evaluator())


def style_fidelity(images: Images, style: str | None = None, refs: Images | None = None,
                   evaluator: Evaluator | None = None) -> dict:
    """How much the images show the reference style (texture); same keys as ``subject_fidelity`` with "style"."""
    return _fidelity("style", images, style, refs, evaluator or load_evaluator())


def prompt_adherence(images: Images, prompt: str, evaluator: Evaluator | None = None) -> dict:
    """Accuracy on the attributes a prompt names.

    Args:
        images: Images generated from ``prompt``.
        prompt: The prompt; its subject/style/colour/background words are found by ``world.parse_prompt``.
        evaluator: Defaults to ``load_evaluator()``.

    Returns:
        ``{"named": {attr: name}, "per_attribute": {attr: acc}, "acc": mean over named attributes or None}``.
    """
    ev = evaluator or load_evaluator()
    named = {k: v for k, v in world.parse_prompt(prompt).items() if v is not None and k in ev.classes}
    probs = ev.predict(images)
    per = {k: float((probs[k].argmax(1) == ev.classes[k].index(v)).mean()) for k, v in named.items()}
    return {"named": named, "per_attribute": per, "acc": float(np.mean(list(per.values()))) if per else None}


def summarize_predictions(images: Images, evaluator: Evaluator | None = None) -> dict[str, dict[str, int]]:
    """Counts of the predicted class per head, e.g. ``{"subject": {"heart": 3, "circle": 1}, ...}``."""
    ev = evaluator or load_evaluator()
    return {h: dict(Counter(names).most_common()) for h, names in ev.classify(images).items()}


def evaluate_images(images: Images, subject_ref: Images | None = None, style_ref: Images | None = None,
                    prompt: str | None = None, evaluator: Evaluator | None = None) -> dict:
    """Every offline metric for a set of images, as a JSON-able dict (the CLI's ``evaluate`` output).

    Args:
        images: The images (a folder, paths, PIL images or an array).
        subject_ref: Reference images of the subject (folder or images), or None.
        style_ref: Reference images of the style, or None.
        prompt: The prompt the images were generated from, or None.
        evaluator: Defaults to ``load_evaluator()``.

    Returns:
        ``{"n_images", "predicted"}`` plus ``"subject"`` (see ``subject_fidelity``) when ``subject_ref`` is given,
        ``"style"`` when ``style_ref`` is given, and ``"prompt"`` (see ``prompt_adherence``) when ``prompt`` is.
    """
    ev = evaluator or load_evaluator()
    imgs = as_pil_list(images)
    out: dict = {"n_images": len(imgs), "predicted": summarize_predictions(imgs, ev)}
    if subject_ref is not None:
        out["subject"] = subject_fidelity(imgs, refs=as_pil_list(subject_ref), evaluator=ev)
    if style_ref is not None:
        out["style"] = style_fidelity(imgs, refs=as_pil_list(style_ref), evaluator=ev)
    if prompt:
        out["prompt"] = prompt_adherence(imgs, prompt, ev)
    return out


def generation_quality(pipe, n: int = 200, seed: int = 4242, steps: int = 20, guidance: float = 5.0,
                       evaluator: Evaluator | None = None) -> dict:
    """How well a text-to-image pipeline draws seeded in-distribution prompts of the world.

    Args:
        pipe: A ``StableDiffusionXLPipeline`` (e.g. ``mini.load_mini()``), 64 px.
        n: Number of prompts (one image each, generator seeded with ``seed + i``).
        seed: Seed of the prompts (base subjects and styles only).
        steps: Inference steps.
        guidance: Classifier-free guidance scale.
        evaluator: Defaults to ``load_evaluator()``.

    Returns:
        ``{"subject_acc", "style_acc", "colour_acc", "sec_per_image" (median), "n", "prompts", "images"}``.
    """
    import time

    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, held_out=False) for _ in range(n)]
    prompts = [world.caption(s, rng) for s in scenes]
    images, secs = [], []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        t0 = time.perf_counter()
        images.append(pipe(p, num_inference_steps=steps, guidance_scale=guidance, generator=g, height=64,
                           width=64).images[0])
        secs.append(time.perf_counter() - t0)
    lab = {k: v for k, v in world.labels(scenes).items() if k in ("subject", "style", "colour")}
    acc = accuracy(evaluator or load_evaluator(), images, lab)
    return {**{f"{k}_acc": v for k, v in acc.items()}, "sec_per_image": float(np.median(secs)), "n": n,
            "prompts": prompts, "images": images}


def accuracy(ev: Evaluator, images: Images, labels: dict[str, Iterable[int]]) -> dict[str, float]:
    """Per-head accuracy against integer labels (indices into ``ev.classes[head]``)."""
    probs = ev.predict(images)
    return {h: float((probs[h].argmax(1) == np.asarray(list(y))).mean()) for h, y in labels.items() if h in probs}
