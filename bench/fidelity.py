"""Fidelity on the test split: every merge method at equal compute, scored by the label-free judge.

The protocol of issue 19 (ZipLoRA's subjects × styles): the 24 pairs of ``zipq_mini.concepts.pairs("test", 4)``
(6 test subjects × 6 test styles, each concept in 4 pairs, drawn from families nothing was tuned on; the first 12,
each concept in 2, were the first protocol and come first). Per pair and
seed (a *shard*): write the concepts' example sets (5 subject images, 3 style images), train subject and style
DoRA (and LoRA for ZipLoRA) with the core's defaults, merge with every method and generate from the prompts
"a photo of a {colour} sks shape in zkz style on a {background} background" (a colour and background per group of
8 images, drawn by the shard's seed). Rows:

- ``<method>`` (direct, zip, zipq, ties, dare, blora; klora when ``zipq_core.merge.klora`` exists, from the two
  adapters with its per-step choice of layers): generated as the app does (``config.Sliders``, the subject part
  weaker below the hand-off, each image the best of mini's ``FamilyDefaults.candidates``): equal compute for every
  method;
- ``subject_only`` / ``style_only``: one adapter at strength 1 with the same candidates;
- ``<method>_file``: the merged file alone at 1 / 1 with one candidate (what ComfyUI and diffusers users get);
  K-LoRA, timestep-dependent, has no static file and no such row.

Shards resume: a shard is ``<shards>/<subject>__<style>__seed<k>.npz`` (the images of every row) and a ``.json``
written last; a started shard keeps its merges and finished rows under ``<shards>/work`` until it is done. Adapters
are the concepts' (``<shards>/adapters/<concept>__seed<k>/``, kept): a subject in four pairs trains once, and
``--part`` gives each process whole subjects.

    python bench/fidelity.py --shards runs/fidelity [--part 1/4] [--seeds 1] [--per-concept 4] [--steps 300]
        [--style-steps N] [--lr-schedule cosine]
    python bench/fidelity.py --shards runs/fidelity --add LABEL --recipe lam=0,balance=relative [--part 1/2]
    python bench/fidelity.py --shards runs/fidelity --report FILE [--markdown F]

``--add`` gives every finished shard the rows of another ZipQDoRA recipe (``run_extra``), beside its own.

``--report`` scores every finished shard with the judge (``zipq_mini.judge``; identification = the nearest
reference centroid among the 6 test concepts of that kind, fidelity = mean cosine to the concept's 16 reference
renders) and the evaluator's colour and background heads (text fidelity: the world still labels those), and
bootstraps paired differences (2000 resamples: pairs, then images within each pair) with 95 % intervals.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import common  # noqa: F401  (first: puts the checkout on the import path)
from common import concept_references, emit_json, load_mini_base, mini_fingerprint, train_concept_adapter

import numpy as np

from zipq_core import GenerateConfig, TrainConfig, ZipqError, generate, load_adapter
from zipq_core.config import FAMILY_DEFAULTS, LR_SCHEDULES, MergeConfig, Sliders
from zipq_core.merge import merge_adapters, slider_adapters
from zipq_mini import concepts, judge, world

MERGES = ["direct", "zip", "zipq", "ties", "dare", "blora"]  # methods that write a merged file
# K-LoRA chooses each layer's adapter anew at every step: generated from the two adapters, no file, no file row.
LIVE = ["klora"] if importlib.util.find_spec("zipq_core.merge.klora") else []
ROWS = ["subject_only", "style_only", *MERGES, *LIVE, *(f"{m}_file" for m in MERGES)]
COMPARISONS = [("zipq", "direct"), ("zipq", "klora"), ("zipq_file", "direct_file"), ("zipq", "subject_only"),
               ("zipq", "style_only")]
METRICS = ["subject_fidelity", "style_fidelity", "subject_id", "style_id", "text"]
FIDELITY = METRICS[:2]
PER_PAIR = [("zipq", "direct"), ("zipq_file", "direct_file")]  # the report's per-pair table: where the means come from
PROMPT = "a photo of a {colour} sks shape in zkz style on a {background} background"
GROUP = 8  # images per prompt (one GenerateConfig batch)


# ------------------------------------------------------------------------------------------------ shards
def shard_rows(methods: list[str]) -> list[str]:
    """A shard's rows with only these methods (``--methods``; the protocol: all of them), in ROWS' order."""
    return [r for r in ROWS if r.endswith("_only") or r.removesuffix("_file") in methods]


def check_methods(shards: Path, methods: list[str]) -> None:
    """One folder, one set of methods: a shard of fewer methods is finished for its folder only (``--methods``)."""
    unknown = [m for m in methods if m not in MERGES + LIVE]
    if unknown or not methods:
        raise SystemExit(f"--methods {','.join(methods)}: choose from {', '.join(MERGES + LIVE)}")
    path = shards / "methods.json"
    recorded = json.loads(path.read_text())["methods"] if path.is_file() else MERGES + LIVE
    if sorted(recorded) != sorted(methods) and (path.is_file() or any(shards.glob("*__*__seed*.json"))):
        raise SystemExit(f"{shards} holds shards of the methods {', '.join(recorded)}; give these methods a new "
                         "--shards folder.")
    if methods != MERGES + LIVE:
        path.write_text(json.dumps({"methods": methods}) + "\n")


def all_pairs() -> list[tuple]:
    """Every test (subject, style) pair; a pair's index here names its shard and draws its prompts."""
    return concepts.pairs("test", len(concepts.split("test").styles))


def shard_tasks(seeds: int, per_concept: int = 4) -> list[tuple[int, int]]:
    """(pair index, seed) of every shard, seed-major so that a partial run covers all pairs first."""
    everything = all_pairs()
    return [(everything.index(p), s) for s in range(seeds) for p in concepts.pairs("test", per_concept)]


def subject_of(task: tuple[int, int]) -> tuple[str, int]:
    """The subject adapter a shard trains or reuses: (subject, seed)."""
    pair, seed = task
    return all_pairs()[pair][0].name, seed


def shard_name(pair: int, seed: int) -> str:
    subject, style = all_pairs()[pair]
    return f"{subject.name}__{style.name}__seed{seed}"


def my_tasks(tasks: list, part: str, group=None) -> list:
    """The tasks of part "i/n" (1-based): every n-th task from the i-th, or with `group` (task → key) every n-th
    group of tasks (in order of first appearance), so that tasks sharing a key (a concept's adapter) run in one
    process, one after the other: a run stopped part-way leaves whole groups done."""
    i, n = (int(x) for x in part.split("/"))
    if not 1 <= i <= n:
        raise SystemExit(f"--part must be i/n with 1 <= i <= n, not {part}")
    if group is None:
        return tasks[i - 1::n]
    keyed = [(group(t), t) for t in tasks]
    mine = list(dict.fromkeys(k for k, _ in keyed))[i - 1::n]
    return [t for key in mine for k, t in keyed if k == key]


def prompts(pair: int, seed: int, images: int) -> list[tuple[str, str]]:
    """(colour, background) per group of GROUP images, drawn by the shard's seed; the colour always contrasts."""
    rng = np.random.default_rng([pair, seed, 19])
    out = []
    for _ in range(-(-images // GROUP)):
        colour = str(rng.choice(world.COLOUR_NAMES))
        backgrounds = [b for b in world.BACKGROUND_NAMES if b != "white" or colour != "yellow"]
        out.append((colour, str(rng.choice(backgrounds))))
    return out


def concept_adapters(base, subject, style, seed: int, work: Path, methods, style_steps: int | None = None,
                     shared: bool = False, **settings) -> dict[str, Path]:
    """Both concepts' example sets and an adapter per kind and method trained on its set with `settings` over
    mini's defaults (the style's with `style_steps` when given): {"subject_dora": folder, …}; finished ones are
    reused. The pair's own (under work/examples, work/<kind>_<method>), or with `shared` the concept's
    (`shared_adapter`: a subject in two pairs trains once)."""
    per_kind = {"subject": settings, "style": settings if style_steps is None else {**settings, "steps": style_steps}}
    if shared:
        return {f"{kind}_{m}": shared_adapter(base, concept, kind, seed, work, method=m, **per_kind[kind])
                for kind, concept in (("subject", subject), ("style", style)) for m in methods}
    sets = {"subject": concepts.write_example_set(subject, work / "examples" / "subject", seed),
            "style": concepts.write_example_set(style, work / "examples" / "style", seed)}
    return {f"{kind}_{m}": train_concept_adapter(base, kind, sets[kind], work / f"{kind}_{m}", method=m, seed=seed,
                                                 **per_kind[kind])
            for kind in ("subject", "style") for m in methods}


def shared_adapter(base, concept, kind: str, seed: int, root: Path, **settings) -> Path:
    """A concept's adapter, trained once per seed and settings under ``root/<concept>__seed<k>/`` (its example set
    beside it) and reused by every shard of that concept. A lock on the concept's folder lets one process train
    while another that wants the same adapter waits for it, then reuses it."""
    home = root / f"{concept.name}__seed{seed}"
    home.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps({"seed": seed, **settings}, sort_keys=True, default=str).encode()).hexdigest()
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when training fails
        examples = concepts.write_example_set(concept, home / "examples", seed)
        return train_concept_adapter(base, kind, examples, home / f"{kind}_{settings.get('method')}_{key[:10]}",
                                     seed=seed, **settings)


def merge(base, method: str, dirs: dict[str, Path], seed: int, args, out: Path, fields: dict | None = None) -> dict:
    """Merge once (reused when done) → {"dir", "merge_seconds", "adapter_bytes"}. `method` also picks the adapters
    (zip: the LoRAs, else the DoRAs); `fields` are MergeConfig fields over it (a recipe: lam=0, method="zip", …)."""
    record = out / "merge.json"
    if record.is_file():
        return json.loads(record.read_text())
    kind = "lora" if method == "zip" else "dora"
    cfg = MergeConfig(**{"method": method, "steps": args.merge_steps, "learning_rate": args.merge_lr, "seed": seed,
                         **(fields or {})})
    last = list(merge_adapters(base, dirs[f"subject_{kind}"], dirs[f"style_{kind}"], cfg, out))[-1]
    info = {"dir": str(out), "merge_seconds": last.elapsed, "adapter_bytes": last.summary.get("adapter_bytes", 0)}
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(info))
    return info


def save_row(path: Path, images: np.ndarray) -> None:
    """Write a row's images so that it counts only once fully written (a temporary file, then renamed)."""
    tmp = path.with_name(f"{path.stem}.tmp.npy")
    np.save(tmp, images)
    tmp.rename(path)


def row_adapters(base, row: str, dirs: dict[str, Path], merged: dict[str, dict]) -> tuple[list, int, object]:
    """What a row generates with: (adapter specs, candidates per image, generate's per-step schedule or None)."""
    best_of, app = FAMILY_DEFAULTS["mini"].candidates, Sliders()
    if row in ("subject_only", "style_only"):
        return [(load_adapter(dirs[f"{row.split('_')[0]}_dora"]), 1.0)], best_of, None
    if row == "klora":  # the app's sliders and hand-off, the layers' choice per step (zipq_core.merge.klora)
        from zipq_core.merge import klora_plan

        plan = klora_plan(base, dirs["subject_dora"], dirs["style_dora"], app)
        return plan.adapters, best_of, plan.schedule
    if row.endswith("_file"):  # the single standard file, as another tool loads it
        return [(load_adapter(Path(merged[row[: -len('_file')]]["dir"]) / "pytorch_lora_weights.safetensors"),
                 1.0)], 1, None
    return slider_adapters(merged[row]["dir"], app.subject, app.style, app.subject_detail), best_of, None


def sample(base, groups: list[tuple[str, str]], seed: int, images: int, adapters, candidates: int,
           schedule=None) -> np.ndarray:
    """Images (N, 64, 64, 3) uint8: group k from PROMPT with its colour and background, seeded 1000 * seed + k."""
    out = []
    options = {} if schedule is None else {"schedule": schedule}
    for k, (colour, background) in enumerate(groups):
        config = GenerateConfig(prompt=PROMPT.format(colour=colour, background=background), seed=1000 * seed + k,
                                steps=20, num_images=min(GROUP, images - k * GROUP), candidates=candidates)
        out += [np.asarray(im.convert("RGB")) for im in generate(base, config, adapters, **options)]
    return np.stack(out)


def run_shard(base, pair: int, seed: int, args, shards: Path) -> Path:
    """Train, merge, generate every row of one shard; rows and adapters resume from ``shards/work``."""
    name = shard_name(pair, seed)
    subject, style = all_pairs()[pair]
    work = shards / "work" / name
    rows_dir = work / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = shard_rows(args.methods)
    dirs = concept_adapters(base, subject, style, seed, shards / "adapters", ("dora", "lora") if "zip" in rows
                            else ("dora",), steps=args.steps, style_steps=args.style_steps, shared=True,
                            learning_rate=args.lr, lr_schedule=args.lr_schedule)
    merged = {m: merge(base, m, dirs, seed, args, work / f"merged_{m}") for m in MERGES if m in rows}
    groups = prompts(pair, seed, args.images)
    for row in rows:
        path = rows_dir / f"{row}.npy"
        if path.is_file():
            continue
        adapters, candidates, schedule = row_adapters(base, row, dirs, merged)
        save_row(path, sample(base, groups, seed, args.images, adapters, candidates, schedule))
        print(f"{name}: {row} done at {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    np.savez_compressed(shards / f"{name}.npz", **{row: np.load(rows_dir / f"{row}.npy") for row in rows})
    meta = {"subject": subject.name, "style": style.name, "pair": pair, "seed": seed, "rows": rows,
            "groups": [{"colour": c, "background": b, "prompt": PROMPT.format(colour=c, background=b)}
                       for c, b in groups], "images": args.images,
            "merges": {m: {k: v for k, v in info.items() if k != "dir"} for m, info in merged.items()},
            "settings": {k: str(v) for k, v in vars(args).items()}, "seconds": round(time.time() - started, 1)}
    (shards / f"{name}.json").write_text(json.dumps(meta, indent=1))  # last: marks the shard finished
    shutil.rmtree(work, ignore_errors=True)
    return shards / f"{name}.json"


def parse_recipe(text: str) -> dict:
    """"lam=0,balance=relative" → MergeConfig fields (ints, then floats, else strings)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        for kind in (int, float, str):
            try:
                out[key.strip()] = kind(value.strip())
                break
            except ValueError:
                continue
    return out


def extra_name(pair: int, seed: int, label: str) -> str:
    return f"{shard_name(pair, seed)}.{label}"


def run_extra(base, pair: int, seed: int, label: str, recipe: dict, shards: Path) -> Path:
    """Rows ``label`` (as the app generates) and ``label_file`` of a ZipQDoRA recipe for a finished shard.

    The shard's two DoRA adapters are its concepts' shared ones (``shards/adapters``), trained again with its
    settings and seed where that folder is gone (a new checkout); the direct merge's file row is generated again
    too and compared with the stored one, so the report can tell whether the adapters (and with them every paired
    difference) were reproduced exactly. Written as ``<shard>.<label>.npz`` and, last, ``.json``.
    """
    name = shard_name(pair, seed)
    meta = json.loads((shards / f"{name}.json").read_text())
    settings = meta["settings"]
    subject, style = all_pairs()[pair]
    work = shards / "work" / extra_name(pair, seed, label)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    style_steps = settings.get("style_steps", "None")  # shards from before it: the style trained --steps too
    dirs = concept_adapters(base, subject, style, seed, shards / "adapters", ("dora",), shared=True,
                            steps=int(settings["steps"]),
                            style_steps=None if style_steps == "None" else int(style_steps),
                            learning_rate=float(settings["lr"]),
                            lr_schedule=settings.get("lr_schedule", "constant"))  # shards from before it: constant
    as_run = argparse.Namespace(merge_steps=int(settings["merge_steps"]), merge_lr=float(settings["merge_lr"]))
    merged = {m: merge(base, "zipq", dirs, seed, as_run, work / f"merged_{m}", fields)
              for m, fields in (("direct", {"method": "direct"}), (label, recipe))}
    groups = [(g["colour"], g["background"]) for g in meta["groups"]]
    rows = {}
    for row in ("direct_file", label, f"{label}_file"):
        path = work / f"{row}.npy"
        if not path.is_file():
            adapters, candidates, schedule = row_adapters(base, row, dirs, merged)
            save_row(path, sample(base, groups, seed, meta["images"], adapters, candidates))
        rows[row] = np.load(path)
    again = np.abs(rows["direct_file"].astype(int) - np.load(shards / f"{name}.npz")["direct_file"])
    np.savez_compressed(shards / f"{extra_name(pair, seed, label)}.npz",
                        **{r: rows[r] for r in (label, f"{label}_file")})
    extra = {"shard": name, "label": label, "recipe": recipe, "rows": [label, f"{label}_file"],
             "direct_file_max_difference": int(again.max()), "direct_file_mean_difference": float(again.mean()),
             "seconds": round(time.time() - started, 1)}
    (shards / f"{extra_name(pair, seed, label)}.json").write_text(json.dumps(extra, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return shards / f"{extra_name(pair, seed, label)}.json"


def check_mini(shards: Path, fingerprint: str) -> None:
    """Shards of one folder come from one mini: record its fingerprint, refuse to add another mini's shards."""
    path = shards / "mini.json"
    if path.is_file():
        made_with = json.loads(path.read_text())["fingerprint"]
        if made_with != fingerprint:
            raise SystemExit(f"{shards} holds shards of another mini (weights {made_with}, this one {fingerprint}); "
                             "give this mini a new --shards folder.")
        return
    if any(shards.glob("*__*__seed*.json")):
        raise SystemExit(f"{shards} holds shards of an unrecorded mini; give this mini a new --shards folder.")
    path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


def run_shards(args) -> None:
    import torch

    torch.set_grad_enabled(True)
    args.shards.mkdir(parents=True, exist_ok=True)
    # a subject's shards in one process: its adapter (under shards/adapters) trains once, while it is not wanted
    tasks = my_tasks(shard_tasks(args.seeds, args.per_concept), args.part, group=subject_of)
    if args.add:  # another recipe's rows for every finished shard of this part
        todo = [t for t in tasks if (args.shards / f"{shard_name(*t)}.json").is_file()
                and not (args.shards / f"{extra_name(*t, args.add)}.json").is_file()]
    else:
        todo = [t for t in tasks if not (args.shards / f"{shard_name(*t)}.json").is_file()]
    print(f"{len(todo)} shards to run", file=sys.stderr, flush=True)
    check_methods(args.shards, args.methods)
    base = load_mini_base(args.mini)
    check_mini(args.shards, mini_fingerprint(base))
    for pair, seed in todo:
        done = (run_extra(base, pair, seed, args.add, parse_recipe(args.recipe), args.shards) if args.add
                else run_shard(base, pair, seed, args, args.shards))
        print(f"done: {done}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ report
def score_images(images: np.ndarray, subject: str, style: str, groups: list[dict], j: judge.Judge,
                 refs: dict[str, dict[str, np.ndarray]], evaluator) -> dict[str, np.ndarray]:
    """Per-image scores (N,) of one row: judge fidelity and identification per kind, text fidelity."""
    out = {}
    for kind, name in (("subject", subject), ("style", style)):
        e = j.embed(list(images), kind)
        out[f"{kind}_fidelity"] = (e @ refs[kind][name].T).mean(axis=1)
        out[f"{kind}_id"] = np.array([n == name for n in judge.identify(e, refs[kind])], dtype=np.float64)
    probs = evaluator.predict(images)
    colours = [g["colour"] for g in groups for _ in range(GROUP)][: len(images)]
    backgrounds = [g["background"] for g in groups for _ in range(GROUP)][: len(images)]
    ok_c = probs["colour"].argmax(1) == np.array([world.COLOUR_NAMES.index(c) for c in colours])
    ok_b = probs["background"].argmax(1) == np.array([world.BACKGROUND_NAMES.index(b) for b in backgrounds])
    out["text"] = (ok_c.astype(np.float64) + ok_b) / 2
    return out


def load_scores(shards: Path, j: judge.Judge, evaluator) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{pair key: {row: {metric: per-image scores over the pair's finished seeds}}}."""
    refs = {k: concept_references(j, "test", k) for k in judge.KINDS}
    out: dict = {}
    for meta_path in sorted(shards.glob("*__*__seed*.json")):  # shards only (a report may sit beside them)
        if "." in meta_path.stem:
            continue  # another recipe's rows: read with their shard
        meta = json.loads(meta_path.read_text())
        key = f"{meta['subject']} × {meta['style']}"
        sources = [(meta_path, meta["rows"])]
        sources += [(p, json.loads(p.read_text())["rows"]) for p in sorted(shards.glob(f"{meta_path.stem}.*.json"))]
        for path, rows in sources:
            data = np.load(path.with_suffix(".npz"))
            for row in rows:
                s = score_images(data[row], meta["subject"], meta["style"], meta["groups"], j, refs, evaluator)
                s["seed"] = np.full(len(data[row]), meta["seed"])  # which of the pair's seeds each image is from
                dest = out.setdefault(key, {}).setdefault(row, {})
                for m, v in s.items():
                    dest[m] = np.concatenate([dest[m], v]) if m in dest else v
    return out


def extra_comparisons(rows: set[str]) -> list[tuple[str, str]]:
    """The comparisons of another recipe's rows (``--add LABEL``): its app row against what zipq's is compared
    with and against zipq itself, its file against the direct and the zipq file."""
    labels = sorted(r for r in rows if r not in ROWS and not r.endswith("_file"))
    return [pair for label in labels for pair in
            [(label, "direct"), (label, "klora"), (label, "zipq"), (label, "subject_only"), (label, "style_only"),
             (f"{label}_file", "direct_file"), (f"{label}_file", "zipq_file")]]


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray], metric: str) -> np.ndarray:
    """Row a − row b image for image, over the seeds both have: another recipe's rows (``--add``) may cover fewer of a
    pair's seeds than the shard's own rows. Within a seed both rows hold the same prompts and seeds in order."""
    shared = np.intersect1d(a["seed"], b["seed"])
    return a[metric][np.isin(a["seed"], shared)] - b[metric][np.isin(b["seed"], shared)]


def bootstrap(per_pair: list[np.ndarray], resamples: int = 2000, seed: int = 0) -> dict:
    """Mean and 95 % interval of per-image values grouped by pair: resample pairs, then images within each."""
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(len(per_pair), size=len(per_pair))
        means[r] = np.mean(np.concatenate([per_pair[p][rng.integers(len(per_pair[p]), size=len(per_pair[p]))]
                                           for p in picked]))
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(np.mean(np.concatenate(per_pair))), "low": float(low), "high": float(high),
            "half_width": float((high - low) / 2), "pairs": len(per_pair),
            "images": int(sum(len(v) for v in per_pair))}


def sizing(per_pair: list[np.ndarray], target: float = 0.03) -> dict:
    """What a paired difference's 95 % interval needs to be no wider than ± `target`.

    Per-image values split into a between-pair variance (how much the pairs' own means differ beyond image noise)
    and a within-pair one (one-way random effects, method of moments). The two-stage bootstrap above draws image
    noise twice (once in each resampled pair's mean, once in the images redrawn within it), so its variance of the
    mean is about between/P + 2·within/(n·P) for P pairs of n images: the projections use that, the estimator the
    acceptance is read from. More images only shrink the second term: `floor` is the half-width with unlimited
    images at these pairs; `images_per_pair` is None when that floor is above the target (more pairs needed), and
    `pairs` is how many pairs reach it at the current images per pair.
    """
    n = float(np.mean([len(v) for v in per_pair]))
    pairs = len(per_pair)
    within = float(np.mean([np.var(v, ddof=1) for v in per_pair]))
    between = max(0.0, float(np.var([np.mean(v) for v in per_pair], ddof=1)) - within / n)
    z2 = (target / 1.96) ** 2
    room = z2 - between / pairs
    return {"between": round(between, 5), "within": round(within, 5), "pairs_now": pairs, "images_now": round(n, 1),
            "half_width_now": round(1.96 * np.sqrt(between / pairs + 2 * within / (n * pairs)), 4),
            "floor": round(1.96 * np.sqrt(between / pairs), 4),
            "images_per_pair": int(np.ceil(2 * within / (pairs * room))) if room > 0 else None,
            "pairs": int(np.ceil((between + 2 * within / n) / z2))}


def report(scores: dict, resamples: int = 2000) -> dict:
    """Per-row means with intervals, and paired differences (same images' seeds and prompts) with intervals."""
    rows = sorted({row for pair in scores.values() for row in pair}, key=lambda r: ROWS.index(r) if r in ROWS else 99)
    table = {row: {m: bootstrap([scores[p][row][m] for p in scores if row in scores[p]], resamples)
                   for m in METRICS} for row in rows}
    diffs = {}
    extra = extra_comparisons(set(rows))
    for a, b in COMPARISONS + extra:
        keys = [p for p in scores if a in scores[p] and b in scores[p]]
        if keys:
            diffs[f"{a} - {b}"] = {m: bootstrap([paired(scores[p][a], scores[p][b], m) for p in keys], resamples)
                                   for m in METRICS}
    sizes = {f"{a} - {b}": {m: sizing([paired(scores[p][a], scores[p][b], m) for p in scores]) for m in METRICS}
             for a, b in COMPARISONS if all(a in scores[p] and b in scores[p] for p in scores) and len(scores) > 1}
    per_pair = {p: {"images": len(next(iter(rows.values()))["subject_fidelity"]),
                    **{f"{a} - {b}": {m: round(float(np.mean(paired(rows[a], rows[b], m))), 4) for m in FIDELITY}
                       for a, b in PER_PAIR + [c for c in extra if c[1].startswith("direct")]
                       if a in rows and b in rows}}
                for p, rows in scores.items()}
    return {"rows": table, "differences": diffs, "sizing": sizes, "pairs": sorted(scores), "per_pair": per_pair}


def markdown(result: dict) -> str:
    def cell(v: dict) -> str:
        return f"{v['mean']:.3f} ± {v['half_width']:.3f}"

    lines = ["| row | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {row} | " + " | ".join(cell(v[m]) for m in METRICS) + " |" for row, v in result["rows"].items()]
    lines += ["", "| paired difference | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {name} | " + " | ".join(f"{v[m]['mean']:+.3f} [{v[m]['low']:+.3f}, {v[m]['high']:+.3f}]"
                                          for m in METRICS) + " |" for name, v in result["differences"].items()]
    lines += ["", "What ± 0.03 needs (`sizing`: the bootstrap's variance split into between pairs and within a pair):",
              "", "| paired difference | metric | half-width now | with unlimited images | images per pair "
              "| pairs at these images |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {m} | {s['half_width_now']:.3f} | {s['floor']:.3f} | "
              f"{s['images_per_pair'] if s['images_per_pair'] is not None else 'not enough'} | {s['pairs']} |"
              for name, v in result.get("sizing", {}).items() for m, s in v.items()]
    compared = {name for v in result.get("per_pair", {}).values() for name in v if " - " in name}
    columns = [(name, m) for name in sorted(compared, key=lambda n: (n not in {f"{a} - {b}" for a, b in PER_PAIR}, n))
               for m in FIDELITY]
    lines += ["", "| pair | images | " + " | ".join(f"{c}: {m}" for c, m in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    lines += [f"| {pair} | {v['images']} | " + " | ".join(f"{v[c][m]:+.3f}" if c in v else "" for c, m in columns)
              + " |" for pair, v in sorted(result.get("per_pair", {}).items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True, help="folder of shards (created; resumed)")
    parser.add_argument("--part", default="1/1", help="run every n-th shard from the i-th: i/n")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--per-concept", type=int, default=4,
                        help="pairs per test concept (2: the first 12 pairs; 4: 24; 6: all 36)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per adapter")
    parser.add_argument("--style-steps", type=int, default=None, help="the style adapters' steps (default: --steps)")
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help="the protocol's adapters: 300 steps at a constant rate (what the stored shards ran), "
                             "whatever mini's defaults become")
    parser.add_argument("--merge-steps", type=int, default=100)
    parser.add_argument("--merge-lr", type=float, default=3e-3)
    parser.add_argument("--images", type=int, default=32, help="images per row and shard (groups of 8 per prompt)")
    parser.add_argument("--methods", type=lambda text: [m for m in text.split(",") if m], default=MERGES + LIVE,
                        help="only these merge methods (comma-separated; their own --shards folder): a quick look, "
                             "not the protocol")
    parser.add_argument("--add", default=None, metavar="LABEL",
                        help="add rows LABEL and LABEL_file of another ZipQDoRA recipe to every finished shard")
    parser.add_argument("--recipe", default="", help="that recipe's MergeConfig fields: lam=0,balance=relative")
    parser.add_argument("--mini", type=Path, default=None, help="a candidate mini's folder (default: assets/mini)")
    parser.add_argument("--report", type=Path, default=None, help="score the finished shards into this JSON file")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    if args.add is not None and (args.add in ROWS or not args.add.isidentifier()):
        raise SystemExit(f"--add {args.add!r}: name the new rows with a word of letters, digits and _ that is not "
                         f"one of the shard's rows ({', '.join(ROWS)})")
    if args.add is not None:
        try:  # a recipe is checked before any shard trains: the core's own message for a bad field or value
            MergeConfig(**parse_recipe(args.recipe))
        except TypeError as error:
            raise SystemExit(f"--recipe {args.recipe!r}: {error}; name MergeConfig fields, e.g. "
                             "lam=0,balance=relative") from None
        except ZipqError as error:
            raise SystemExit(f"--recipe {args.recipe!r}: {error}") from None
    if args.report is None:
        run_shards(args)
        return
    from zipq_mini.evaluator import load_evaluator

    started = time.time()
    result = report(load_scores(args.shards, judge.load_judge(), load_evaluator()), args.resamples)
    extras = [json.loads(p.read_text()) for p in sorted(args.shards.glob("*__*__seed*.*.json"))]
    if extras:  # was each recipe's pair of adapters the shard's own? (0: its direct file came back pixel-exact)
        added = result["added_rows"] = {e["label"]: {"recipe": e["recipe"], "direct_file_difference": {}}
                                        for e in extras}
        for e in extras:  # in 0..255 levels: the largest over the shard's pixels, and the mean
            added[e["label"]]["direct_file_difference"][e["shard"]] = [e["direct_file_max_difference"],
                                                                       round(e["direct_file_mean_difference"], 5)]
    result["seconds"] = round(time.time() - started, 1)
    emit_json(result, args.report)
    if args.markdown:
        args.markdown.write_text(markdown(result))


if __name__ == "__main__":
    main()
