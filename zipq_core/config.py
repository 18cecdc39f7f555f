"""One validated config dataclass per stage.

Each `__post_init__` checks what a person can get wrong and raises `ZipqError` with a message that
says what to change, so the CLI and the app can show it as it is.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import ZipqError

Kind = Literal["subject", "style"]
Method = Literal["lora", "dora"]
QuantizeBase = Literal["none", "int8", "nf4"]
TimestepBias = Literal["auto", "uniform", "low_noise", "high_noise"]
TIMESTEP_BIASES: tuple[str, ...] = ("auto", "uniform", "low_noise", "high_noise")
TargetBlocks = Literal["auto", "all", "decoder"]
TARGET_BLOCKS: tuple[str, ...] = ("auto", "all", "decoder")
# The UNet's decoder half: where B-LoRA (arXiv 2403.14572) finds SDXL's style block, and on mini the blocks that
# draw texture. A style adapter kept there cannot redraw the layout, so it composes with a subject adapter.
DECODER_BLOCKS: tuple[str, ...] = ("up_blocks.",)

ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD_TARGETS: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2")
# Named target sets. "full" adds the transformer's projections and the ResNet convolutions: on mini the
# convolutions at the 16×16 latent level (no attention there) are where fine texture is drawn, and style
# personalisation needs them (held-out styles 0.36 → 0.72 accuracy at 300 steps; bench/personalization.py).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_TARGETS,
    "attention+ff": ATTENTION_TARGETS + FEED_FORWARD_TARGETS,
    "full": ATTENTION_TARGETS + FEED_FORWARD_TARGETS + ("proj_in", "proj_out", "conv1", "conv2"),
}
DEFAULT_TARGETS: tuple[str, ...] = TARGET_PRESETS["full"]
MAX_STRENGTH = 1.5
MAX_CANDIDATES = 8  # images generated per returned image (GenerateConfig.candidates)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ZipqError(message)


# Tokens reach file names (downloads) and prompts: letters, digits, '_' and '-' only, so no token can name a
# folder ('/', '..') or smuggle words into a prompt. Class nouns reach prompts only, as plain printable text.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_NOUN_CHARS = 64
MAX_PROMPT_CHARS = 1000


def check_token(token: object, what: str = "The token") -> str:
    """A concept token: 1–32 letters, digits, '_' or '-' (the whole string; no trailing newline)."""
    _check(isinstance(token, str) and TOKEN_PATTERN.fullmatch(token) is not None,
           f"{what} {str(token)[:40]!r} must be one word of at most 32 letters, digits, '_' or '-', e.g. 'sks' or "
           "'zkz'.")
    return token


def check_noun(noun: object, what: str = "The class noun") -> str:
    """A class noun: at most 64 printable characters (it goes into prompts, never into file names)."""
    _check(isinstance(noun, str) and len(noun) <= MAX_NOUN_CHARS and noun.isprintable(),
           f"{what} must be at most {MAX_NOUN_CHARS} printable characters (e.g. 'dog', 'coffee mug').")
    return noun


def check_prompt(prompt: object, what: str = "The prompt") -> str:
    """A prompt: printable text of at most 1000 characters (CLIP reads only its first 77 tokens anyway)."""
    _check(isinstance(prompt, str) and len(prompt) <= MAX_PROMPT_CHARS and prompt.isprintable(),
           f"{what} must be printable text of at most {MAX_PROMPT_CHARS} characters.")
    return prompt


def check_finite(value: float, name: str) -> float:
    _check(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, not {value}.")
    return float(value)


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how. The defaults suit the bundled `mini` model on a CPU."""

    kind: Kind = field(default="subject", metadata={"help": "'subject' (a thing) or 'style' (a look)."})
    token: str = field(default="sks", metadata={"help": "Rare word that names the new concept in prompts."})
    class_noun: str = field(default="", metadata={"help": "What the subject is ('dog', 'mug'); for a style, "
                                                          "the kind of thing pictured in the style images."})
    method: Method = field(default="dora", metadata={"help": "'dora' (weight-decomposed LoRA) or 'lora'."})
    rank: int = field(default=8, metadata={"help": "Adapter rank r (1–256)."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; scale = alpha / rank. None: = rank."})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS,
                                            metadata={"help": "UNet module name suffixes to adapt."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate (mini: 3e-3; 1e-4 is usual "
                                                                 "for SDXL)."})
    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=2, metadata={"help": "Images per step."})
    resolution: int = field(default=64, metadata={"help": "Training resolution in pixels (multiple of 8)."})
    seed: int = field(default=0, metadata={"help": "Seed for noise, timesteps and batches: same seed, same adapter."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps."})
    target_blocks: TargetBlocks = field(default="auto", metadata={
        "help": "Which UNet blocks the target modules are taken from. 'auto': all of them for a subject, the "
                "decoder half (up_blocks) for a style; 'all'; 'decoder'. On mini a decoder-half style adapter "
                "textures unseen shapes better and leaves the subject's layout to the subject adapter in a merge "
                "(direct-merge subject fidelity 0.725 -> 0.821 in a one-seed probe on 4 held-out pairs)."})
    timestep_bias: TimestepBias = field(default="auto", metadata={
        "help": "Which noise levels training favours. 'auto': 'high_noise' for a subject (its shape is laid out "
                "early in sampling), 'uniform' (DreamBooth's) for a style: on mini a style's texture is decided "
                "at every noise level, and 'low_noise' lowered held-out style accuracy (0.91 -> 0.78)."})
    flip: bool = field(default=True, metadata={"help": "Also train on mirrored images (off for text/logos)."})
    prior_preservation: bool = field(default=False, metadata={"help": "DreamBooth prior preservation."})
    prior_weight: float = field(default=1.0, metadata={"help": "Weight of the prior-preservation loss."})
    num_class_images: int = field(default=8, metadata={"help": "Class images generated for the prior."})
    quantize_base: QuantizeBase = field(default="none", metadata={"help": "QDoRA: train on an 8-bit or 4-bit base."})
    sample_every: int = field(default=0, metadata={"help": "Render a preview every N steps (0: never)."})
    checkpoint_every: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N steps."})

    def __post_init__(self) -> None:
        _check(self.kind in ("subject", "style"), f"kind must be 'subject' or 'style', not {self.kind!r}.")
        _check(self.method in ("lora", "dora"), f"method must be 'lora' or 'dora', not {self.method!r}.")
        check_token(self.token, "The token")
        check_noun(self.class_noun)
        _check(1 <= self.rank <= 256, f"rank must be between 1 and 256, not {self.rank}.")
        _check(self.alpha is None or self.alpha > 0, f"alpha must be positive, not {self.alpha}.")
        _check(len(self.target_modules) > 0, "Name at least one target module, e.g. to_q,to_k,to_v,to_out.0.")
        _check(0 < self.learning_rate <= 1.0, f"learning rate {self.learning_rate} is out of range: try 1e-4…1e-2.")
        _check(1 <= self.steps <= 100_000, f"steps must be between 1 and 100000, not {self.steps}.")
        _check(1 <= self.batch_size <= 64, f"batch size must be between 1 and 64, not {self.batch_size}.")
        _check(64 <= self.resolution <= 2048 and self.resolution % 8 == 0,
               f"resolution must be a multiple of 8 between 64 and 2048, not {self.resolution}.")
        _check(0 <= self.warmup_steps < self.steps, "warm-up steps must be fewer than the training steps.")
        _check(self.prior_weight >= 0, "prior weight must be ≥ 0.")
        _check(self.target_blocks in TARGET_BLOCKS,
               f"target blocks must be one of {', '.join(TARGET_BLOCKS)}, not {self.target_blocks!r}.")
        _check(self.timestep_bias in TIMESTEP_BIASES,
               f"timestep bias must be one of {', '.join(TIMESTEP_BIASES)}, not {self.timestep_bias!r}.")
        _check(1 <= self.num_class_images <= 1000, "number of class images must be between 1 and 1000.")
        _check(self.quantize_base in ("none", "int8", "nf4"),
               f"quantize_base must be 'none', 'int8' or 'nf4', not {self.quantize_base!r}.")
        _check(self.sample_every >= 0 and self.checkpoint_every >= 0, "sample/checkpoint intervals must be ≥ 0.")
        if self.prior_preservation:
            _check(bool(self.class_noun),
                   "Prior preservation needs a class noun (e.g. 'dog') to generate class images.")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def noise_bias(self) -> str:
        """The timestep bias in effect ('auto' resolved by kind)."""
        if self.timestep_bias != "auto":
            return self.timestep_bias
        return "high_noise" if self.kind == "subject" else "uniform"

    @property
    def block_prefixes(self) -> tuple[str, ...]:
        """UNet module-path prefixes the adapter is limited to (empty: every block); 'auto' resolved by kind."""
        blocks = self.target_blocks
        if blocks == "auto":
            blocks = "all" if self.kind == "subject" else "decoder"
        return DECODER_BLOCKS if blocks == "decoder" else ()

    @property
    def instance_prompt(self) -> str:
        """The caption every training image gets unless it has a sidecar .txt."""
        if self.kind == "subject":
            return f"a photo of {self.token} {self.class_noun}".strip()
        thing = self.class_noun or "picture"
        return f"a {thing} in {self.token} style"

    @property
    def class_prompt(self) -> str:
        return f"a photo of {self.class_noun}" if self.kind == "subject" else f"a {self.class_noun or 'picture'}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass(frozen=True)
class GenerateConfig:
    """One generation request."""

    prompt: str = "a photo of sks dog"
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 5.0
    width: int = 64
    height: int = 64
    num_images: int = 1
    # Noise level (fraction of the training timesteps) below which adapters given a detail strength switch
    # to it. 0.5 on mini: the layout is settled by then and the texture not yet drawn.
    handoff: float = 0.5
    # Images generated per returned image; the adapters pick the best (zipq_core.rerank). 1 = a plain request.
    candidates: int = 1

    def __post_init__(self) -> None:
        _check(isinstance(self.prompt, str) and bool(self.prompt.strip()),
               "Write a prompt: the images are generated from it.")
        check_prompt(self.prompt)
        check_prompt(self.negative_prompt, "The negative prompt")
        _check(1 <= self.candidates <= MAX_CANDIDATES,
               f"candidates per image must be between 1 and {MAX_CANDIDATES}, not {self.candidates}.")
        _check(0.0 <= self.handoff <= 1.0, f"the hand-off must be between 0 and 1, not {self.handoff}.")
        _check(1 <= self.steps <= 200, f"steps must be between 1 and 200, not {self.steps}.")
        _check(0.0 <= self.guidance <= 30.0, f"guidance must be between 0 and 30, not {self.guidance}.")
        for side, value in (("width", self.width), ("height", self.height)):
            _check(64 <= value <= 2048 and value % 8 == 0,
                   f"{side} must be a multiple of 8 between 64 and 2048, not {value}.")
        _check(1 <= self.num_images <= 16, f"number of images must be between 1 and 16, not {self.num_images}.")
        _check(0 <= self.seed < 2**63, "seed must be a non-negative integer.")


def parse_targets(text: str) -> tuple[str, ...]:
    """A preset name ("attention", "attention+ff", "full") or comma-separated module suffixes."""
    text = text.strip()
    if text in TARGET_PRESETS:
        return TARGET_PRESETS[text]
    return tuple(s.strip() for s in text.split(",") if s.strip())


def check_strength(strength: float) -> float:
    """Validate an adapter strength (DESIGN §6: 0 = base exactly, 1 = as trained)."""
    _check(0.0 <= strength <= MAX_STRENGTH, f"adapter strength must be between 0 and {MAX_STRENGTH}, not {strength}.")
    return float(strength)


def check_fraction(value: float, name: str) -> float:
    """Validate a value that must lie in [0, 1] (a subject detail, a hand-off)."""
    _check(0.0 <= value <= 1.0, f"{name} must be between 0 and 1, not {value}.")
    return float(value)
