"""Resumable training state: `<out>/checkpoints/step-NNNNNN/` holds the adapter so far, the optimizer, the learning-
rate schedule, the random generator and the configuration that made it, so a resumed run ends exactly where an
uninterrupted one does and cannot silently continue under other settings."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import torch

from ..adapters import CHECKPOINT_DIR
from ..config import TrainConfig
from ..errors import ZipqError

ADAPTER_NAME = "zipq_train"
CONFIG_NAME = "train_config.json"
# Settings that may differ on resume: they change how long or how visibly a run goes, not what it learns.
RESUMABLE_CHANGES = frozenset({"steps", "sample_every", "checkpoint_every", "gradient_checkpointing"})


def peft_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def save_checkpoint(out_dir: Path, step: int, unet, optimizer, lr_sched, generator, curve: list[float],
                    cfg: TrainConfig, scaler=None) -> Path:
    from safetensors.torch import save_file

    ckpt = Path(out_dir) / CHECKPOINT_DIR / f"step-{step:06d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in peft_state(unet).items()},
              str(ckpt / "adapter.safetensors"))
    (ckpt / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=1))
    # trainer_state.pt last: its presence marks the checkpoint complete (latest_checkpoint looks for it).
    state = {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(),
             "generator": generator.get_state(), "curve": curve}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    torch.save(state, ckpt / "trainer_state.pt")
    return ckpt


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under an output folder, if any."""
    found = sorted(Path(out_dir).glob(f"{CHECKPOINT_DIR}/step-*/trainer_state.pt"))
    return found[-1].parent if found else None


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step-"))


def checkpoint_config(ckpt: Path) -> TrainConfig | None:
    """The configuration a checkpoint was made with (None for checkpoints of older versions)."""
    path = Path(ckpt) / CONFIG_NAME
    return TrainConfig.from_dict(json.loads(path.read_text())) if path.exists() else None


def find_checkpoint(out_dir: Path, resume: bool | str | Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None when not resuming), refused when `cfg` would train something else."""
    if not resume:
        return None
    ckpt = latest_checkpoint(out_dir) if resume is True else Path(resume)
    if ckpt is None:
        raise ZipqError(f"Nothing to resume: no checkpoint under {Path(out_dir).name}/{CHECKPOINT_DIR}. Start a "
                        "training instead.")
    saved = checkpoint_config(ckpt)
    if saved is not None:
        changed = [f.name for f in fields(TrainConfig) if f.name not in RESUMABLE_CHANGES
                   and getattr(saved, f.name) != getattr(cfg, f.name)]
        if changed:
            raise ZipqError(f"The checkpoint was made with other settings ({', '.join(changed)}): resume with the "
                            "settings it started with, or start a new training.")
    if checkpoint_step(ckpt) > cfg.steps:
        raise ZipqError(f"The checkpoint is at step {checkpoint_step(ckpt)}, past the {cfg.steps} steps asked for: "
                        "resume with at least as many steps.")
    return ckpt


def load_checkpoint(ckpt: Path, unet, optimizer, lr_sched, generator, scaler=None) -> tuple[int, list[float]]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # our own file: tensors and numbers only
    result = set_peft_model_state_dict(unet, load_file(str(ckpt / "adapter.safetensors")),
                                       adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise ZipqError(f"Checkpoint {ckpt.name} does not match this training configuration (rank/targets differ).")
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    generator.set_state(state["generator"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"]), list(state["curve"])


def remove_checkpoints(out_dir: str | Path) -> None:
    """Drop the resume points of a finished training (GBs at SDXL scale)."""
    shutil.rmtree(Path(out_dir) / CHECKPOINT_DIR, ignore_errors=True)
