"""Every stage's settings, validated, and the defaults per base-model family, in one torch-free module.

Each dataclass's `__post_init__` checks what a person can get wrong and raises `ZipqError` with a message that
says what to change, so the CLI and the app can show it as it is. A field's `metadata["help"]` is its
documentation and the CLI's `--help` text; `metadata["flags"]` adds the CLI's short aliases (`--lr`);
`metadata["cli"] = False` keeps a field off the command line. `python -m zipq_core --help` imports this module
and nothing that needs torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ZipqError

Kind = Literal["subject", "style"]
Method = Literal["lora", "dora"]
QuantizeBase = Literal["none", "int8", "nf4"]
TimestepBias = Literal["auto", "uniform", "low_noise", "high_noise"]
TargetBlocks = Literal["auto", "all", "decoder"]
LrSchedule = Literal["constant", "cosine"]
# "klora" is a merge method with no merged file (its choice of adapter changes every step): it is in MergeMethod so
# that `merge --method klora` reaches the refusal that names the generate command, and not in METHODS (the methods
# that write a file).
MergeMethod = Literal["zipq", "zip", "direct", "ties", "dare", "blora", "klora"]
Family = Literal["mini", "sd1", "sd2", "sdxl"]
Arch = Literal["sd1", "sd2", "sdxl"]  # the architecture of a base: mini is an SDXL
METHODS: tuple[str, ...] = ("zipq", "zip", "direct", "ties", "dare", "blora")
BALANCES: tuple[str, ...] = ("plain", "relative", "geometric")  # MergeConfig.balance: its terms' weights
KLORA_HAS_NO_FILE = ("K-LoRA picks each layer's adapter anew at every denoising step, so there is no merged file to "
                     "write: generate with it directly, `python -m zipq_core generate --klora SUBJECT STYLE --prompt "
                     "...` (zipq_core.merge.klora.klora_generate in Python).")
TIMESTEP_BIASES: tuple[str, ...] = ("auto", "uniform", "low_noise", "high_noise")
TARGET_BLOCKS: tuple[str, ...] = ("auto", "all", "decoder")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
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
TRAIN_SAMPLE_STEPS = 20  # denoising steps of a training preview and of a prior-preservation class image

# Tokens reach file names (downloads) and prompts: letters, digits, '_' and '-' only, so no token can name a
# folder ('/', '..') or smuggle words into a prompt. Class nouns reach prompts only, as plain printable text.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_NOUN_CHARS = 64
MAX_PROMPT_CHARS = 1000
# Pillow raises DecompressionBombError above 2 × MAX_IMAGE_PIXELS (≈ 179 MP by default) whatever we allow, so a
# higher limit here could never be reached; keep a margin below it.
MEGAPIXEL_CEILING = 170.0


# ------------------------------------------------------------------------------------------------- checks
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ZipqError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def check_finite(value: object, name: str) -> float:
    """A finite number (NaN and ±inf pass every `<` comparison's negation, so range checks alone miss them)."""
    _check(_is_number(value) and math.isfinite(value), f"{name} must be a finite number, not {value}.")
    return float(value)


def check_strength(strength: float) -> float:
    """Validate an adapter strength (DESIGN §6: 0 = base exactly, 1 = as trained)."""
    _check(_is_number(strength) and 0.0 <= strength <= MAX_STRENGTH,
           f"adapter strength must be between 0 and {MAX_STRENGTH}, not {strength}.")
    return float(strength)


def check_fraction(value: float, name: str) -> float:
    """Validate a value that must lie in [0, 1] (a subject detail, a hand-off)."""
    _check(_is_number(value) and 0.0 <= value <= 1.0, f"{name} must be between 0 and 1, not {value}.")
    return float(value)


def parse_targets(text: str) -> tuple[str, ...]:
    """A preset name ("attention", "attention+ff", "full") or comma-separated module suffixes."""
    text = text.strip()
    return TARGET_PRESETS[text] if text in TARGET_PRESETS else parse_list(text)


def parse_list(text: str) -> tuple[str, ...]:
    """Comma-separated names ("up_blocks.0.,mid_block.") as a tuple, blanks dropped."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _help(text: str, *flags: str, **extra: Any) -> dict:
    return {"help": text, "flags": flags, **extra}


# ------------------------------------------------------------------------------------------- base families
@dataclass(frozen=True)
class FamilyDefaults:
    """What a base-model family trains and generates with unless told otherwise."""

    learning_rate: float
    rank: int
    targets: str  # a TARGET_PRESETS name
    steps: int
    batch_size: int
    gradient_checkpointing: bool  # recompute activations in backward: ~25 % slower, a fraction of the memory
    aspect_buckets: bool  # train on each image's own aspect ratio (the mini world is square)
    merge_batch: int  # latents per concept per learned-merge step
    candidates: int  # candidates per image when generating from a merge (each costs a full generation)
    blora_split: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # B-LoRA (content, style) UNet blocks
    lr_schedule: LrSchedule = "constant"  # TrainConfig.lr_schedule
    style_steps: int | None = None  # a style adapter's steps (None: `steps`, as a subject's)

    def steps_for(self, kind: str) -> int:
        """Training steps for an adapter of this kind ('subject' or 'style')."""
        return kind_steps(kind, self.steps, self.style_steps)


def kind_steps(kind: str, steps: int, style_steps: int | None) -> int:
    """An adapter's training steps: `style_steps` for a style when given, else `steps`."""
    return style_steps if kind == "style" and style_steps is not None else steps


# mini: the recipe its benchmarks measure (bench/personalization.py, bench/merge_quality.py). Real bases: the usual
# DreamBooth-LoRA recipe for those models (attention projections, lr 1e-4; 3e-3 would be ~30× too much), batch 1
# with gradient checkpointing (what brings SDXL at 1024 px under 12 GB: bench/real_scale.py), one latent per
# concept per merge step, one candidate per image (on SDXL a candidate is a whole 1024 px generation).
_REAL = dict(learning_rate=1e-4, rank=16, targets="attention", steps=500, batch_size=1, gradient_checkpointing=True,
             aspect_buckets=True, merge_batch=1, candidates=1)
# B-LoRA's split, as UNet module-name prefixes (content blocks, style blocks): on SDXL the paper's two attentions of
# up_blocks.0 (arXiv 2403.14572); SD1.x/SD2.x have no such pair, so B-LoRA is refused there.
BLORA_SDXL = (("up_blocks.0.attentions.0.",), ("up_blocks.0.attentions.1.",))
# mini: the subject's encoder half and mid block, the style's decoder half; of six splits on the tuning split
# (bench/blora_split.py, bench/results/blora_split.json) it identified subject and style best together (0.34 / 0.38
# against the SDXL split's 0.16 / 0.25; 4 pairs × 8 images, the merged file alone).
BLORA_MINI = (("down_blocks.", "mid_block."), ("up_blocks.",))
# mini trains a subject 3000 steps with a cosine rate: on the tuning split's unseen subjects, judge identification
# went 0.42 (300 steps, constant) → 0.48 (300, cosine) → 0.49 (1200) → 0.62 (3000, constant) → 0.68 (3000, cosine)
# → 0.73 (6000, not taken: twice the time for a gain inside run-to-run noise). A style keeps 300 steps: on tuning
# styles 3000 steps gained +0.04 on average over two seeds (0.32 → 0.30, 0.34 → 0.44), under the +0.05 asked for
# ten times the time. bench/personalization_split.py, bench/README.md "Longer training".
FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "mini": FamilyDefaults(learning_rate=3e-3, rank=8, targets="full", steps=3000, batch_size=2,
                           gradient_checkpointing=False, aspect_buckets=False, merge_batch=2, candidates=8,
                           blora_split=BLORA_MINI, lr_schedule="cosine", style_steps=300),
    "sd1": FamilyDefaults(**_REAL),
    "sd2": FamilyDefaults(**_REAL),
    "sdxl": FamilyDefaults(**_REAL, blora_split=BLORA_SDXL),
}


def family_defaults(family: str) -> FamilyDefaults:
    _check(family in FAMILY_DEFAULTS, f"unknown base family {family!r}: one of {', '.join(FAMILY_DEFAULTS)}.")
    return FAMILY_DEFAULTS[family]


def family_table() -> str:
    """The family defaults as a plain-text table (the CLI's --help epilog, the Train tab's note)."""
    rows = [f"{'family':<6} {'lr':>7} {'schedule':<8} {'rank':>4} {'targets':<10} {'steps':>16} {'batch':>5} "
            f"{'checkpointing':>13} {'buckets':>7} {'merge batch':>11} {'candidates':>10}"]
    on = lambda flag: "on" if flag else "off"
    steps = lambda d: (f"{d.steps} (style {d.steps_for('style')})" if d.steps_for("style") != d.steps
                       else str(d.steps))
    rows += [f"{name:<6} {d.learning_rate:>7g} {d.lr_schedule:<8} {d.rank:>4} {d.targets:<10} {steps(d):>16} "
             f"{d.batch_size:>5} {on(d.gradient_checkpointing):>13} {on(d.aspect_buckets):>7} {d.merge_batch:>11} "
             f"{d.candidates:>10}"
             for name, d in FAMILY_DEFAULTS.items()]
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    """How uploads are checked and turned into training views."""

    resolution: int = field(default=64, metadata=_help("Side of the square training images in pixels (multiple "
                                                         "of 8, 64–2048)."))
    min_side: int = field(default=64, metadata=_help("Images with a side shorter than this are skipped."))
    max_megapixels: float = field(default=50.0, metadata=_help("Images larger than this are skipped, checked from "
                                                                 "the header before decoding."))
    min_images: int = field(default=2, metadata=_help("Fewer usable images than this stops the run."))
    max_images: int = field(default=100, metadata=_help("More usable images than this stops the run."))
    buckets: bool = field(default=False, metadata=_help("Keep each image's aspect ratio: crop it to the nearest of "
                                                          "a set of sizes of about resolution² pixels instead of a "
                                                          "centred square."))

    def __post_init__(self) -> None:
        _check(_is_int(self.resolution) and 64 <= self.resolution <= 2048 and self.resolution % 8 == 0,
               f"resolution must be a multiple of 8 between 64 and 2048, not {self.resolution!r} "
               "(64 for mini, 512 for SD1.5, 1024 for SDXL).")
        _check(_is_int(self.min_side) and 1 <= self.min_side <= 8192,
               f"min_side must be a whole number of pixels between 1 and 8192, not {self.min_side!r}.")
        _check(_is_number(self.max_megapixels) and 0 < self.max_megapixels <= MEGAPIXEL_CEILING,
               f"max_megapixels must be above 0 and at most {MEGAPIXEL_CEILING:g}, not {self.max_megapixels!r}.")
        _check(self.min_side**2 <= self.max_megapixels * 1e6,
               f"min_side {self.min_side} px needs at least {self.min_side**2 / 1e6:g} megapixels; "
               "raise max_megapixels or lower min_side.")
        _check(_is_int(self.min_images) and self.min_images >= 1,
               f"min_images must be at least 1, not {self.min_images!r}.")
        _check(_is_int(self.max_images) and self.min_images <= self.max_images <= 10_000,
               f"max_images must be between min_images ({self.min_images}) and 10000, not {self.max_images!r}.")


# ------------------------------------------------------------------------------------------------- train
@dataclass(frozen=True)
class TrainConfig:
    """What to train and how. The defaults suit the bundled `mini` model on a CPU; `for_family` gives another
    family's (FAMILY_DEFAULTS)."""

    kind: Kind = field(default="subject", metadata=_help("'subject' (a thing) or 'style' (a look)."))
    token: str = field(default="sks", metadata=_help("Rare word that names the new concept in prompts (letters, "
                                                       "digits, '_' or '-'), e.g. sks (subject) or zkz (style)."))
    class_noun: str = field(default="", metadata=_help("What the subject is ('dog', 'mug'); for a style, the kind "
                                                         "of thing pictured in the style images."))
    method: Method = field(default="dora", metadata=_help("'dora' (weight-decomposed LoRA) or 'lora'."))
    rank: int = field(default=8, metadata=_help("Adapter rank r (1–256)."))
    alpha: float | None = field(default=None, metadata=_help("LoRA alpha; scale = alpha / rank (default: = rank)."))
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata=_help(
        f"UNet modules to adapt: a preset ({', '.join(TARGET_PRESETS)}) or comma-separated module name suffixes.",
        "--targets", parse="targets"))
    learning_rate: float = field(default=3e-3, metadata=_help("AdamW learning rate.", "--lr"))
    steps: int = field(default=200, metadata=_help("Optimizer steps."))
    batch_size: int = field(default=2, metadata=_help("Images per step.", "--batch"))
    resolution: int = field(default=64, metadata=_help("Training resolution in pixels, a multiple of 8 (default: "
                                                         "the base model's native size)."))
    seed: int = field(default=0, metadata=_help("Seed for noise, timesteps and batches: same seed, same adapter."))
    warmup_steps: int = field(default=0, metadata=_help("Linear learning-rate warm-up steps."))
    lr_schedule: LrSchedule = field(default="constant", metadata=_help(
        "The learning rate after the warm-up: 'constant', or 'cosine' (halved at mid-run, near 0 at the last "
        "step, so the adapter ends on a settled point rather than on one noisy step)."))
    target_blocks: TargetBlocks = field(default="auto", metadata=_help(
        "Which UNet blocks the target modules are taken from. 'auto': all of them for a subject, the decoder half "
        "(up_blocks) for a style; 'all'; 'decoder'. On mini a decoder-half style adapter textures unseen shapes "
        "better and leaves the subject's layout to the subject adapter in a merge (direct-merge subject fidelity "
        "0.725 -> 0.821 in a one-seed probe on 4 held-out pairs)."))
    timestep_bias: TimestepBias = field(default="auto", metadata=_help(
        "Which noise levels training favours. 'auto': 'high_noise' for a subject (its shape is laid out early in "
        "sampling), 'uniform' (DreamBooth's) for a style: on mini a style's texture is decided at every noise "
        "level, and 'low_noise' lowered held-out style accuracy (0.91 -> 0.78)."))
    flip: bool = field(default=True, metadata=_help("Also train on mirrored images (off for text/logos)."))
    aspect_buckets: bool = field(default=False, metadata=_help(
        "Train each image at its own aspect ratio (sizes of about resolution² pixels, 1:2 to 2:1) instead of a "
        "centred square crop; SDXL is told each image's original size and crop."))
    prior_preservation: bool = field(default=False, metadata=_help("DreamBooth prior preservation."))
    prior_weight: float = field(default=1.0, metadata=_help("Weight of the prior-preservation loss."))
    num_class_images: int = field(default=8, metadata=_help("Class images generated for the prior."))
    quantize_base: QuantizeBase = field(default="none", metadata=_help("QDoRA: train on an 8-bit or 4-bit base."))
    sample_every: int = field(default=0, metadata=_help("Render a preview every N steps (0: never)."))
    checkpoint_every: int = field(default=0, metadata=_help("Save a resumable checkpoint every N steps (0: never)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "Recompute the UNet's activations during the backward pass: about a quarter slower, a fraction of the "
        "memory (what fits SDXL at 1024 px in 12 GB)."))
    gradient_accumulation: int = field(default=1, metadata=_help(
        "Micro-batches per optimizer step: an effective batch of batch × this at the memory of one batch."))
    optimizer: Literal["adamw", "adamw8bit"] = field(default="adamw", metadata=_help(
        "AdamW, or bitsandbytes' 8-bit AdamW (its two moments in 8 bits: 6 bytes less per trainable weight)."))

    def __post_init__(self) -> None:
        _check(self.kind in ("subject", "style"), f"kind must be 'subject' or 'style', not {self.kind!r}.")
        _check(self.method in ("lora", "dora"), f"method must be 'lora' or 'dora', not {self.method!r}.")
        check_token(self.token, "The token")
        check_noun(self.class_noun)
        _check(_is_int(self.rank) and 1 <= self.rank <= 256, f"rank must be between 1 and 256, not {self.rank}.")
        _check(self.alpha is None or (_is_number(self.alpha) and 0 < self.alpha < math.inf),
               f"alpha must be a positive number, not {self.alpha}.")
        _check(len(self.target_modules) > 0, "Name at least one target module, e.g. to_q,to_k,to_v,to_out.0.")
        _check(_is_number(self.learning_rate) and 0 < self.learning_rate <= 1.0,
               f"learning rate {self.learning_rate} is out of range: try 1e-4…1e-2.")
        _check(_is_int(self.steps) and 1 <= self.steps <= 100_000,
               f"steps must be between 1 and 100000, not {self.steps}.")
        _check(_is_int(self.batch_size) and 1 <= self.batch_size <= 64,
               f"batch size must be between 1 and 64, not {self.batch_size}.")
        _check(_is_int(self.resolution) and 64 <= self.resolution <= 2048 and self.resolution % 8 == 0,
               f"resolution must be a multiple of 8 between 64 and 2048, not {self.resolution}.")
        _check(_is_int(self.warmup_steps) and 0 <= self.warmup_steps < self.steps,
               "warm-up steps must be fewer than the training steps.")
        _check(self.lr_schedule in LR_SCHEDULES,
               f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}.")
        _check(_is_number(self.prior_weight) and 0 <= self.prior_weight < math.inf, "prior weight must be ≥ 0.")
        _check(self.target_blocks in TARGET_BLOCKS,
               f"target blocks must be one of {', '.join(TARGET_BLOCKS)}, not {self.target_blocks!r}.")
        _check(self.timestep_bias in TIMESTEP_BIASES,
               f"timestep bias must be one of {', '.join(TIMESTEP_BIASES)}, not {self.timestep_bias!r}.")
        _check(_is_int(self.num_class_images) and 1 <= self.num_class_images <= 1000,
               "number of class images must be between 1 and 1000.")
        _check(self.quantize_base in ("none", "int8", "nf4"),
               f"quantize_base must be 'none', 'int8' or 'nf4', not {self.quantize_base!r}.")
        _check(self.sample_every >= 0 and self.checkpoint_every >= 0, "sample/checkpoint intervals must be ≥ 0.")
        _check(_is_int(self.gradient_accumulation) and 1 <= self.gradient_accumulation <= 64,
               f"gradient accumulation must be between 1 and 64, not {self.gradient_accumulation}.")
        _check(self.optimizer in ("adamw", "adamw8bit"),
               f"optimizer must be 'adamw' or 'adamw8bit', not {self.optimizer!r}.")
        if self.prior_preservation:
            _check(bool(self.class_noun),
                   "Prior preservation needs a class noun (e.g. 'dog') to generate class images.")

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> TrainConfig:
        """The family's defaults (FAMILY_DEFAULTS; steps per kind), then `overrides` (None values are ignored)."""
        d = family_defaults(family)
        base = {"learning_rate": d.learning_rate, "rank": d.rank, "target_modules": TARGET_PRESETS[d.targets],
                "steps": d.steps_for(overrides.get("kind") or cls.kind), "batch_size": d.batch_size,
                "gradient_checkpointing": d.gradient_checkpointing, "aspect_buckets": d.aspect_buckets,
                "lr_schedule": d.lr_schedule}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

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

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of `to_dict` (unknown keys, e.g. from a newer version, are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


# ------------------------------------------------------------------------------------------------- merge
@dataclass(frozen=True)
class MergeConfig:
    """How to merge. Learned methods (zipq, zip) use steps/lr/lam; the others are training-free."""

    method: MergeMethod = field(default="zipq", metadata=_help("zipq (ZipQDoRA), zip (ZipLoRA), direct, ties, "
                                                                 "dare or blora (klora has no file: generate "
                                                                 "--klora)."))
    steps: int = field(default=100, metadata=_help("Merger optimisation steps (ZipLoRA's budget: ≤ 100)."))
    learning_rate: float = field(default=3e-3, metadata=_help("Adam lr for the mergers (no weight decay); 1e-2 "
                                                                "let noisy steps undo the subject on mini.", "--lr"))
    lam: float = field(default=0.01, metadata=_help("λ of the merger-similarity term (summed over layers)."))
    batch_size: int = field(default=2, metadata=_help("Latents per concept per step."))
    seed: int = field(default=0, metadata=_help("Seed for the merge's noise and timesteps."))
    subject_weight: float = field(default=1.0, metadata=_help("Subject weight (direct/ties/dare)."))
    style_weight: float = field(default=1.0, metadata=_help("Style weight (direct/ties/dare)."))
    blora_content: tuple[str, ...] = field(default=(), metadata=_help(
        "B-LoRA: UNet blocks whose subject layers are kept, comma-separated name prefixes.", parse="list"))
    blora_style: tuple[str, ...] = field(default=(), metadata=_help(
        "B-LoRA: UNet blocks whose style layers are kept, comma-separated name prefixes.", parse="list"))
    density: float = field(default=0.5, metadata=_help("Fraction of ΔW kept by TIES trimming / DARE."))
    early_stop: float = field(default=1e-3, metadata=_help("Stop when the mean similarity falls below this."))
    # The paper's cosine by default: DESIGN §7's product term also rewards shrinking both mergers, and it gave
    # the lowest subject and style fidelity in each of three comparisons on mini (4 held-out pairs each).
    similarity: Literal["product", "cosine"] = field(default="cosine", metadata=_help(
        "Merger-similarity term: |cos(m_c, m_s)| (cosine, ZipLoRA's paper) or mean|m_c⊙m_s| (product)."))
    balance: Literal["plain", "relative", "geometric"] = field(default="plain", metadata=_help(
        "Reconstruction terms: plain (ZipLoRA's sum), relative (each divided by how far its adapter moves the "
        "base's prediction, so a subtle subject counts as much as a strong style; two more UNet passes a step) or "
        "geometric (each divided by its own current value: the sum of their logarithms, so one adapter's strong "
        "leak into the other's prompts does not outweigh the rest; no extra pass)."))
    keep_subject: float = field(default=0.0, metadata=_help(
        "Weight of a subject-keeping term: on the subject's images under the combined prompt (its caption, then "
        "'in <style token> style'), the merged prediction should match the subject adapter's on its own caption "
        "(one more UNet pass a step; 0: ZipLoRA's loss)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "Recompute the UNet's activations in backward (default: the base family's; on for real bases)."))

    def __post_init__(self) -> None:
        _check(self.method != "klora", KLORA_HAS_NO_FILE)
        _check(_is_number(self.keep_subject) and math.isfinite(self.keep_subject) and 0 <= self.keep_subject <= 10,
               f"keep_subject must be a number from 0 to 10 (e.g. 0.5), not {self.keep_subject}.")
        _check(self.balance in BALANCES, f"balance must be one of {', '.join(BALANCES)}, not {self.balance!r}.")
        _check(self.method in METHODS, f"merge method {self.method!r} is unknown: use one of {', '.join(METHODS)}.")
        _check(_is_int(self.steps) and 1 <= self.steps <= 1000,
               f"merge steps must be between 1 and 1000, not {self.steps}.")
        _check(_is_number(self.learning_rate) and 0 < self.learning_rate <= 1,
               f"merge learning rate {self.learning_rate} is out of range (try 1e-3…5e-2).")
        _check(self.similarity in ("product", "cosine"),
               f"similarity must be 'product' or 'cosine', not {self.similarity!r}.")
        _check(_is_number(self.lam) and math.isfinite(self.lam) and self.lam >= 0,
               f"λ must be a finite number ≥ 0 (e.g. 0.01), not {self.lam}.")
        _check(_is_number(self.early_stop) and math.isfinite(self.early_stop) and self.early_stop >= 0,
               f"early stop must be a finite number ≥ 0, not {self.early_stop}.")
        _check(_is_int(self.batch_size) and 1 <= self.batch_size <= 64,
               f"merge batch size must be between 1 and 64, not {self.batch_size}.")
        _check(_is_number(self.density) and 0 < self.density <= 1, f"density must be in (0, 1], not {self.density}.")
        for name in ("subject_weight", "style_weight"):
            value = getattr(self, name)
            _check(_is_number(value) and 0 <= value <= 1.5, f"{name.replace('_', ' ')} must be between 0 and 1.5.")
        for name in ("blora_content", "blora_style"):
            value = getattr(self, name)
            _check(isinstance(value, tuple) and all(isinstance(v, str) and v for v in value),
                   f"{name.replace('_', ' ')} must be UNet block name prefixes such as 'up_blocks.0.attentions.0.'.")

    @property
    def learned(self) -> bool:
        return self.method in ("zipq", "zip")

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> MergeConfig:
        """The family's merge batch and checkpointing (FAMILY_DEFAULTS), then `overrides` (None values are ignored)."""
        defaults = family_defaults(family)
        base = {"batch_size": defaults.merge_batch, "gradient_checkpointing": defaults.gradient_checkpointing}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


# ---------------------------------------------------------------------------------------------- generate
MIN_SIDE, MAX_SIDE = 64, 2048  # an image's side in pixels (a multiple of 8)


@dataclass(frozen=True)
class GenerateConfig:
    """One generation request."""

    prompt: str = field(default="a photo of sks dog", metadata=_help("What to draw."))
    negative_prompt: str = field(default="", metadata=_help("What not to draw."))
    seed: int = field(default=0, metadata=_help("Seed of the first image; the others follow from it."))
    steps: int = field(default=20, metadata=_help("Denoising steps."))
    guidance: float = field(default=5.0, metadata=_help("Classifier-free guidance scale."))
    width: int = field(default=64, metadata=_help("Image width in pixels (default: the base model's size)."))
    height: int = field(default=64, metadata=_help("Image height in pixels (default: the base model's size)."))
    num_images: int = field(default=1, metadata=_help("Images to return."))
    # Noise level (fraction of the training timesteps) below which adapters given a detail strength switch
    # to it. 0.5 on mini: the layout is settled by then and the texture not yet drawn.
    handoff: float = field(default=0.5, metadata=_help("Noise level (0–1) below which an adapter's detail strength "
                                                         "applies (a merge's --subject-detail)."))
    # Images generated per returned image; the adapters pick the best (zipq_core.generation.rerank).
    candidates: int = field(default=1, metadata=_help(
        "Images generated per returned image, the best picked by the adapters themselves (default: with --merged "
        "the base family's, else 1)."))

    def __post_init__(self) -> None:
        _check(isinstance(self.prompt, str) and bool(self.prompt.strip()),
               "Write a prompt: the images are generated from it.")
        check_prompt(self.prompt)
        check_prompt(self.negative_prompt, "The negative prompt")
        _check(_is_int(self.candidates) and 1 <= self.candidates <= MAX_CANDIDATES,
               f"candidates per image must be between 1 and {MAX_CANDIDATES}, not {self.candidates}.")
        check_fraction(self.handoff, "the hand-off")
        _check(_is_int(self.steps) and 1 <= self.steps <= 200, f"steps must be between 1 and 200, not {self.steps}.")
        _check(_is_number(self.guidance) and 0.0 <= self.guidance <= 30.0,
               f"guidance must be between 0 and 30, not {self.guidance}.")
        for side, value in (("width", self.width), ("height", self.height)):
            _check(_is_int(value) and MIN_SIDE <= value <= MAX_SIDE and value % 8 == 0,
                   f"{side} must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}, not {value}.")
        _check(_is_int(self.num_images) and 1 <= self.num_images <= 16,
               f"number of images must be between 1 and 16, not {self.num_images}.")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed must be a non-negative integer.")


@dataclass(frozen=True)
class Sliders:
    """How to generate from a merged adapter: the app's, the CLI's and the benchmark's defaults.

    The subject part decides the layout at high noise; left at full strength in the late steps it can paint its
    training images' flat fill over the style's texture, hence `subject_detail` (its strength below the hand-off).
    Which initial noise an image starts from matters more than any slider (a large shape shows its texture, a thin
    one cannot), hence candidates (FamilyDefaults.candidates): each image is the best of several, picked by the two
    parts. The defaults (subject 1.5, style 1, constant strengths: the merged file at those weights, as other tools
    load it) were chosen on the tuning split with mini's current adapters (bench/results/merge_sliders_3000.md, by
    a rule set before the runs); the earlier 1.5 / 1.5 with detail 0.5 suited 300-step subjects and now trades
    their subject away. How and on which seeds: bench/README.md (merge sliders, candidate rules).
    """

    subject: float = field(default=1.5, metadata=_help("The merge's subject part strength (0 = off, 1 = as "
                                                         "trained, up to 1.5).", name="--subject-strength"))
    style: float = field(default=1.0, metadata=_help("The merge's style part strength.", name="--style-strength"))
    subject_detail: float = field(default=1.0, metadata=_help(
        "The subject part's strength below the hand-off, as a fraction of its strength (1 = constant strengths, "
        "as the merged file gives in other tools)."))

    def __post_init__(self) -> None:
        check_strength(self.subject)
        check_strength(self.style)
        check_fraction(self.subject_detail, "subject detail")


@dataclass(frozen=True)
class KLoraConfig:
    """K-LoRA (Ouyang et al., CVPR 2025): at each denoising step every adapted layer takes the change of one adapter,
    the subject's when S_c / γ > S_s · (α · progress + β), else the style's. S = the sum of the k largest |ΔW|
    elements of that adapter's layer, γ = the mean over shared layers of Σ|ΔW_c| / Σ|ΔW_s|, progress = the step's
    index / the number of steps (0 at the first step): the subject is favoured early, the style late. The defaults
    are the authors' released code's (SDXL)."""

    top_k: int = field(default=64, metadata=_help("K-LoRA's k: how many of each layer's largest |ΔW| elements are "
                                                    "summed.", name="--klora-k"))
    alpha: float = field(default=1.5, metadata=_help("K-LoRA's α: how much the style's score grows from the first "
                                                       "step to the last.", name="--klora-alpha"))
    beta: float = field(default=0.5, metadata=_help("K-LoRA's β: the style score's factor at the first step.",
                                                      name="--klora-beta"))

    def __post_init__(self) -> None:
        _check(_is_int(self.top_k) and 1 <= self.top_k <= 10**7, f"K-LoRA's k must be between 1 and 10^7, not "
               f"{self.top_k!r}.")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            _check(_is_number(value) and math.isfinite(value) and value >= 0,
                   f"K-LoRA's {name} must be a finite number ≥ 0, not {value!r}.")


def with_overrides(config: Any, **overrides: Any) -> Any:
    """`dataclasses.replace` that ignores None values (an unset CLI flag or form field)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
