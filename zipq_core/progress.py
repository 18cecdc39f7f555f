"""The record every long stage (train, merge, generate) yields per step: what a progress bar or a job shows.

Stages are generators of `Step` records (smalldiffusion's pattern): the caller owns display and can stop the
stage between steps. Each stage adds its own fields in a subclass (`TrainStep`, `MergeStep`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Step:
    """One step of a stage; the last record has `done` (or `cancelled`) set."""

    step: int
    total: int
    loss: float = math.nan
    elapsed: float = 0.0  # seconds since the stage's first step began
    eta: float = math.nan  # seconds left at the current pace
    done: bool = False
    cancelled: bool = False
    adapter_dir: Path | None = None  # set on the last record of a stage that saves an adapter
    messages: list[str] = field(default_factory=list)  # lines for a log (e.g. the data stage's skipped files)
    sample: Any = None  # a preview image (PIL), if the stage makes them


@dataclass
class TrainStep(Step):
    """One record from the training generator (elapsed excludes set-up)."""

    lr: float = math.nan
    checkpoint: Path | None = None  # set when this step saved a resumable checkpoint


@dataclass
class MergeStep(Step):
    """One record from the merge generator; the last carries the merged adapter's `summary`."""

    loss_subject: float = math.nan
    loss_style: float = math.nan
    similarity: float = math.nan
    summary: dict = field(default_factory=dict)


def eta(elapsed: float, done: int, total: int) -> float:
    """Seconds left when `done` of `total` units took `elapsed` seconds (nan before the first unit)."""
    return elapsed / done * (total - done) if done > 0 else math.nan
