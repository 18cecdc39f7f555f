"""What every benchmark shares: the checkout on the import path, and JSON on stdout (and, with --out, in a file).

Every benchmark imports this module first, so `python bench/<name>.py` runs from a checkout without
installing the package or setting PYTHONPATH.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def emit_json(result: dict, out: Path | None) -> None:
    """Print the result as JSON and write the same text to `out` when given."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        out.write_text(text)


def concept_token(kind: str) -> str:
    """The word that names a zipq_mini.concepts concept of this kind ("subject" or "style") in its captions."""
    from zipq_mini import concepts

    return concepts.SUBJECT_TOKEN if kind == "subject" else concepts.STYLE_TOKEN


def concept_config(kind: str, **settings):
    """The TrainConfig of a concept of this kind: mini's family defaults with its token and class noun, then
    `settings`."""
    from zipq_core import TrainConfig

    noun = "shape" if kind == "subject" else "picture"
    return TrainConfig.for_family("mini", kind=kind, token=concept_token(kind), class_noun=noun, **settings)


def concept_images(folder: Path, cfg):
    """A concept's example set as training reads it: its images with the captions of the set's sidecar files."""
    from zipq_core.data import DataConfig, prepare_images

    return prepare_images(folder, cfg.instance_prompt, DataConfig(), token=cfg.token)


def train_concept_adapter(base, kind: str, folder: Path, out: Path, marker: Path | None = None, **settings) -> Path:
    """An adapter trained on a concept's example set (zipq_mini.concepts: its tokens and class nouns, captions from
    the set's sidecar files), with mini's family defaults then `settings`; a finished one (`marker`, by default
    out/done) is reused, so an interrupted benchmark resumes."""
    from zipq_core import train_adapter

    marker = marker or out / "done"
    if marker.is_file():
        return out
    cfg = concept_config(kind, **settings)
    images = concept_images(folder, cfg)
    shutil.rmtree(out, ignore_errors=True)
    for _ in train_adapter(base, images, cfg, out):
        pass
    marker.write_text("")
    return out


def load_mini_base(weights: Path | None = None):
    """The bundled ``mini`` base (its family defaults), with every component's weights from the diffusers folder
    ``weights`` when given: how a candidate mini is measured before it replaces ``assets/mini``."""
    from zipq_core import load_base

    base = load_base("mini")
    if weights is not None:
        from diffusers import StableDiffusionXLPipeline

        other = StableDiffusionXLPipeline.from_pretrained(str(weights), local_files_only=True)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if name == "unet" and other.unet.config.block_out_channels != base.unet.config.block_out_channels:
                # a wider (or narrower) UNet takes the place of the shipped one, frozen and on the base's device
                base.pipe.unet = other.unet.to(base.device, base.dtype).requires_grad_(False).eval()
            else:
                getattr(base.pipe, name).load_state_dict(getattr(other, name).state_dict())
    return base


def mini_fingerprint(base) -> str:
    """A short hash of the base's weights (UNet, VAE, both text encoders): which mini a result was made with."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for key, tensor in getattr(base.pipe, name).state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().half().numpy().tobytes())
    return digest.hexdigest()[:16]


def concept_references(j, split_name: str, kind: str) -> dict:
    """{concept name: the judge's embeddings (16, D) of its 16 reference renders} for every concept of that kind
    ("subject" or "style") in a split of zipq_mini.concepts: what fidelity and identification are measured against."""
    from zipq_mini import concepts

    s = concepts.split(split_name)
    return {c.name: j.embed(concepts.reference_images(c, 16, seed=0), kind)
            for c in (s.subjects if kind == "subject" else s.styles)}
