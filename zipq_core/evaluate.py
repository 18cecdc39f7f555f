"""Evaluation: how well images show a subject, a style and what their prompt asked for.

A *judge* embeds images per aspect ("subject", "style"); fidelity is the mean cosine between the images'
embeddings and reference images' (DINO for subjects and CLIP-I for styles in ZipLoRA's protocol), and
identification picks, for each image, the nearest concept among several references. Two judges exist:
- `ClipDinoJudge` here, for a user who has CLIP and DINO in the local Hugging Face cache (never downloads);
- the offline world's judges in `zipq_mini` (the product never needs them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from .errors import ZipqError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

ImageLike = Image.Image | np.ndarray | str | Path
Images = Sequence[ImageLike] | np.ndarray | torch.Tensor | str | Path


def load_images(folder: str | Path) -> list[Image.Image]:
    """All images of a folder (sorted by name), as RGB PIL images.

    Args:
        folder: A directory of .png/.jpg/.jpeg/.webp/.bmp files, or one image file.

    Returns:
        The images.

    Raises:
        ZipqError: when the path does not exist or holds no image.
    """
    p = Path(folder)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise ZipqError(f"No such image folder: {p}. Pass a directory of PNG/JPEG images.")
    if not files:
        raise ZipqError(f"{p} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(im.convert("RGB"))
    return out


def as_pil_list(images: Images) -> list[Image.Image]:
    """Normalise the accepted image inputs (folder, paths, PIL, uint8 arrays, [B, 3, H, W] in [0, 1]) to RGB PIL."""
    if isinstance(images, (str, Path)):
        return load_images(images)
    if isinstance(images, torch.Tensor):  # (B, 3, H, W) in [0, 1]
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
        images = arr.astype(np.uint8)
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        return [Image.fromarray(a.astype(np.uint8)).convert("RGB") for a in images]
    out = []
    for im in images:
        if isinstance(im, (str, Path)):
            out.extend(load_images(im))
        elif isinstance(im, np.ndarray):
            out.append(Image.fromarray(im.astype(np.uint8)).convert("RGB"))
        else:
            out.append(im.convert("RGB"))
    if not out:
        raise ZipqError("No images to evaluate.")
    return out


class Judge(Protocol):
    """Embeds images per aspect: `embed(images, aspect)` → [N, D] (any scale; cosines are taken)."""

    def embed(self, images: Images, aspect: str) -> torch.Tensor: ...


def _unit(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t.float(), dim=-1)


def similarity(judge: Judge, images: Images, refs: Images, aspect: str) -> torch.Tensor:
    """Each image's mean cosine to the reference images under the judge's `aspect` embedding: [N]."""
    return (_unit(judge.embed(images, aspect)) @ _unit(judge.embed(refs, aspect)).T).mean(1)


def identify(judge: Judge, images: Images, references: Mapping[str, Images], aspect: str) -> list[str]:
    """For each image, the concept whose references it is most similar to (mean cosine), among `references`."""
    names = list(references)
    scores = torch.stack([similarity(judge, images, references[n], aspect) for n in names], dim=1)  # [N, C]
    return [names[i] for i in scores.argmax(1).tolist()]


class ClipDinoJudge:
    """ZipLoRA's metrics: DINO ViT-S/16 CLS features for subjects, CLIP image features for styles.

    Loads from the local cache only (`local_files_only=True`); a missing model raises `ZipqError`.
    """

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14", dino_model: str = "facebook/dino-vits16"):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        try:
            self.clip = CLIPModel.from_pretrained(clip_model, local_files_only=True).eval()
            self.clip_processor = CLIPProcessor.from_pretrained(clip_model, local_files_only=True)
            self.dino = AutoModel.from_pretrained(dino_model, local_files_only=True).eval()
            self.dino_processor = AutoImageProcessor.from_pretrained(dino_model, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ZipqError(f"CLIP/DINO are not in the local Hugging Face cache ({e}); download {clip_model} and "
                            f"{dino_model} once, or evaluate offline on mini.") from e

    @torch.no_grad()
    def embed(self, images: Images, aspect: str) -> torch.Tensor:
        pils = as_pil_list(images)
        if aspect == "subject":
            return self.dino(**self.dino_processor(images=pils, return_tensors="pt")).last_hidden_state[:, 0]
        return self.clip.get_image_features(**self.clip_processor(images=pils, return_tensors="pt"))

    @torch.no_grad()
    def text_similarity(self, images: Images, prompt: str) -> float:
        """CLIP-T: mean cosine of the images' and the prompt's CLIP embeddings."""
        e = _unit(self.embed(images, "style"))
        t = _unit(self.clip.get_text_features(**self.clip_processor(text=[prompt], return_tensors="pt",
                                                                    padding=True)))
        return float((e @ t.T).mean())


def feature_metrics(images: Images, subject_ref: Images | None = None, style_ref: Images | None = None,
                    prompt: str | None = None, **models: str) -> dict:
    """ZipLoRA's DINO / CLIP-I / CLIP-T scores when CLIP and DINO are cached locally; `{}` when they are not.

    Args:
        images: generated images.
        subject_ref: subject references: gives `dino`.
        style_ref: style references: gives `clip_i`.
        prompt: gives `clip_t`.
        models: `clip_model` / `dino_model` hub ids or folders.
    """
    try:
        judge = ClipDinoJudge(**models)
    except (ZipqError, ImportError):
        return {}
    out = {}
    if subject_ref is not None:
        out["dino"] = float(similarity(judge, images, subject_ref, "subject").mean())
    if style_ref is not None:
        out["clip_i"] = float(similarity(judge, images, style_ref, "style").mean())
    if prompt:
        out["clip_t"] = judge.text_similarity(images, prompt)
    return out
