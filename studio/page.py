"""The page: a header with the base model, one-click examples and the whole flow, then the tabs of the flow
(Subject · Style · Train · Merge · Generate · Compare); and the events that connect it to the handlers.

Expert knobs sit in closed "Advanced" groups. The page polls the job registry once a second (`gr.Timer`), so a
reload or a second tab re-attaches to running jobs, and the poll is the session's heartbeat.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import gradio as gr

from zipq_core.base import BaseModel
from zipq_core.config import (
    KLORA_HAS_NO_FILE,
    LR_SCHEDULES,
    MAX_CANDIDATES,
    METHODS,
    GenerateConfig,
    Sliders,
    family_defaults,
    family_table,
)

from .flow import (
    DEFAULT_STYLE_EXAMPLE,
    DEFAULT_SUBJECT_EXAMPLE,
    LIMITS,
    MERGE_LABELS,
    NATIVE_FORMAT,
    MergeForm,
    TrainForm,
    download_formats,
    example_names,
)
from .handlers import POLL_SECONDS, SERIES_COLOURS, Handlers, describe_base, family_note, noun_choices
from .sessions import Settings

TOKEN_SUGGESTIONS = {"subject": ["sks", "ohwx", "zwx"], "style": ["zkz", "xyz", "szn"]}


@dataclass
class UI:
    """The components that events read and write (built by `build_ui`, wired by `wire`)."""

    c: dict[str, Any]

    def __getitem__(self, name: str):
        return self.c[name]

    def __call__(self, *names: str) -> list:
        return [self.c[n] for n in names]


def header_markdown() -> str:
    return ("# ZipQDoRA Studio\nAny subject in any style: upload a subject and a style, train two adapters, merge "
            "them with ZipQDoRA, generate with a strength slider for each.")


def _images_tab(c: dict, kind: str, base: BaseModel) -> None:
    low, high = LIMITS[kind]
    what = "subject (a thing: the same object, pet, character)" if kind == "subject" else \
        "style (the look you want: a painting, a texture, an illustration style)"
    gr.Markdown(f"Upload **{low}–{high}** images of the {what}, with an optional caption file `<image name>.txt` "
                f"each. Every image is checked, turned upright, converted to RGB and centre-cropped to a square of "
                f"{base.default_size} px; files that cannot be used are listed with the reason.")
    with gr.Row():
        with gr.Column(scale=1):
            c[f"{kind}_files"] = gr.File(label=f"{kind.title()} images", file_count="multiple",
                                         file_types=["image", ".txt"], elem_id=f"{kind}_files")
            c[f"{kind}_token"] = gr.Dropdown(TOKEN_SUGGESTIONS[kind], value=TOKEN_SUGGESTIONS[kind][0],
                                             allow_custom_value=True, label="Token",
                                             info="A rare word that will name the new concept in prompts (letters, "
                                                  "digits, '_' or '-').")
            nouns = noun_choices(kind, base.is_mini)
            c[f"{kind}_noun"] = gr.Dropdown(nouns, value=nouns[0] if kind == "style" else None,
                                            allow_custom_value=True,
                                            label="Class noun" if kind == "subject" else "What the images show",
                                            info="What the subject is (dog, mug)." if kind == "subject" else
                                            "Optional: the kind of thing pictured in the style images.")
            c[f"{kind}_use"] = gr.Button(f"Use these {kind} images", variant="primary")
        with gr.Column(scale=2):
            c[f"{kind}_gallery"] = gr.Gallery(label="Training views (cropped)", columns=5, height=260,
                                              format="png", object_fit="contain", elem_id=f"{kind}_gallery",
                                              fit_columns=False)
            c[f"{kind}_notes"] = gr.Markdown(elem_id=f"{kind}_notes")


def _train_tab(c: dict, base: BaseModel) -> None:
    d = family_defaults(base.family)
    with gr.Row():
        c["train_which"] = gr.Radio(["subject", "style", "both"], value="both", label="Train")
        c["method"] = gr.Radio([("DoRA", "dora"), ("LoRA", "lora")], value="dora", label="Adapter")
        c["steps"] = gr.Number(d.steps, precision=0, minimum=1, maximum=100000, label="Subject steps",
                               elem_id="steps")
        c["style_steps"] = gr.Number(d.steps_for("style"), precision=0, minimum=1, maximum=100000,
                                     label="Style steps", elem_id="style_steps")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            c["rank"] = gr.Slider(1, 64, value=d.rank, step=1, label="Rank")
            c["lr"] = gr.Number(d.learning_rate, label="Learning rate")
            c["lr_schedule"] = gr.Radio(list(LR_SCHEDULES), value=d.lr_schedule, label="Learning-rate schedule",
                                        info="cosine: from the full rate down toward 0 by the last step")
            c["resolution"] = gr.Number(base.default_size, precision=0, minimum=64, maximum=2048, step=8,
                                        label="Resolution (px)")
            c["previews"] = gr.Number(TrainForm.previews, precision=0, minimum=0, maximum=100,
                                      label="Previews per training (0: none)")
        with gr.Row():
            c["quantize"] = gr.Radio([("none", "none"), ("8-bit", "int8"), ("4-bit NF4", "nf4")], value="none",
                                     label="QDoRA: quantized frozen base")
            c["int8"] = gr.Checkbox(label="Also save an INT8 adapter", value=False)
            c["prior"] = gr.Checkbox(label="Prior preservation (subject)", value=False)
        c["family_note"] = gr.Markdown(family_note(base))
        gr.Markdown(f"```\n{family_table()}\n```")
    with gr.Row():
        c["train_btn"] = gr.Button("Train", variant="primary")
        c["resume_btn"] = gr.Button("Resume from checkpoint")
        c["train_cancel"] = gr.Button("Cancel", variant="stop")
    with gr.Accordion("Use an existing LoRA (instead of training)", open=False):
        gr.Markdown("A LoRA, DoRA, LoHa or LoKr made for this base model elsewhere (kohya, ComfyUI, A1111/Forge, "
                    "diffusers, peft): one `.safetensors` file, with peft's `adapter_config.json` if it has one. "
                    "It becomes the subject or the style adapter; merge and generate as with a trained one.")
        with gr.Row():
            c["import_files"] = gr.File(label="Adapter file", file_count="multiple", elem_id="import_files",
                                        file_types=[".safetensors", ".json"], scale=2)
            with gr.Column(scale=1):
                c["import_kind"] = gr.Radio(["subject", "style"], value="subject", label="Use it as")
                c["import_btn"] = gr.Button("Use this adapter")
    c["train_msg"] = gr.Markdown()
    with gr.Row():
        with gr.Column(scale=2):
            c["train_status"] = gr.Markdown("No training yet.", elem_id="train_status")
            with gr.Row():
                for kind in ("subject", "style"):
                    c[f"{kind}_plot"] = gr.LinePlot(x="step", y="loss", color="series", label=f"{kind.title()} loss",
                                                    height=240, color_map=SERIES_COLOURS)
        with gr.Column(scale=1):
            c["train_samples"] = gr.Gallery(label="Previews", columns=2, height=260, format="png")
            c["train_format"] = format_choice("train_format")
            c["subject_dl"] = gr.DownloadButton("Download subject adapter", interactive=False, elem_id="subject_dl")
            c["style_dl"] = gr.DownloadButton("Download style adapter", interactive=False, elem_id="style_dl")


def format_choice(elem_id: str) -> gr.Dropdown:
    """The download format: the studio's own file, or a file one tool reads exactly (zipq_core.adapters.export)."""
    formats = download_formats()
    return gr.Dropdown([("studio (diffusers layout, as made here)", NATIVE_FORMAT)] + [(f, f) for f in formats],
                       value=NATIVE_FORMAT, label="Download format", elem_id=elem_id,
                       info=" · ".join(f"{name}: {text}" for name, text in formats.items())[:600] or None)


def _merge_tab(c: dict) -> None:
    choices = [(MERGE_LABELS.get(m, m), m) for m in METHODS]
    if KLORA_HAS_NO_FILE:  # K-LoRA picks the adapters anew at each step: offered so the page can say what it is
        choices.append((MERGE_LABELS["klora"], "klora"))
    with gr.Row():
        c["merge_method"] = gr.Dropdown(choices, value="zipq", label="Method",
                                        info="ZipQDoRA / ZipLoRA learn per-column mergers; the others are "
                                             "training-free.")
        c["merge_steps"] = gr.Number(100, precision=0, minimum=1, maximum=1000, label="Steps", elem_id="merge_steps")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            c["lam"] = gr.Number(0.01, label="λ (merger similarity penalty)")
            c["merge_subject_w"] = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Subject weight (direct/TIES/DARE)")
            c["merge_style_w"] = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Style weight (direct/TIES/DARE)")
            c["density"] = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Density (TIES/DARE)")
        c["keep_subject"] = gr.Slider(0, 10, value=MergeForm.keep_subject, step=0.5,
                                      label="Keep subject (ZipQDoRA / ZipLoRA)",
                                      info="Up when the merge loses the subject: the merge learns to keep it under "
                                           "the combined prompt, at some cost in style; one more pass a step.")
    with gr.Row():
        c["merge_btn"] = gr.Button("Merge", variant="primary")
        c["merge_cancel"] = gr.Button("Cancel", variant="stop")
        c["merged_format"] = format_choice("merged_format")
        c["merged_dl"] = gr.DownloadButton("Download merged adapter", interactive=False, elem_id="merged_dl")
    c["merge_msg"] = gr.Markdown()
    c["merge_status"] = gr.Markdown("No merge yet.", elem_id="merge_status")
    c["merge_plot"] = gr.LinePlot(x="step", y="loss", color="series", label="Merge loss", height=220,
                                  color_map=SERIES_COLOURS)


def _generate_tab(c: dict, base: BaseModel) -> None:
    size = base.default_size
    with gr.Row():
        with gr.Column(scale=1):
            c["prompt"] = gr.Textbox(Settings().prompt, label="Prompt", lines=2)
            with gr.Row():
                c["subject_strength"] = gr.Slider(0, 1.5, value=Sliders.subject, step=0.05, label="Subject strength")
                c["style_strength"] = gr.Slider(0, 1.5, value=Sliders.style, step=0.05, label="Style strength")
            with gr.Row():
                c["num_images"] = gr.Slider(1, 8, value=4, step=1, label="Images")
                c["seed"] = gr.Number(0, precision=0, minimum=0, label="Seed")
                c["dice"] = gr.Button("Random seed")
            with gr.Accordion("Advanced", open=False):
                c["negative"] = gr.Textbox("", label="Negative prompt")
                with gr.Row():
                    c["width"] = gr.Slider(64, 2048, value=size, step=8, label="Width")
                    c["height"] = gr.Slider(64, 2048, value=size, step=8, label="Height")
                with gr.Row():
                    c["gen_steps"] = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    c["guidance"] = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                c["subject_detail"] = gr.Slider(
                    0, 1, value=Sliders.subject_detail, step=0.05, label="Subject in fine detail",
                    info="The subject's strength in the late steps, where texture is drawn, as a fraction of its "
                         "strength: lower lets the style show through (1 = constant, as the merged file gives in "
                         "other tools).")
                c["handoff"] = gr.Slider(
                    0, 1, value=GenerateConfig.handoff, step=0.05, label="Hand-off (noise level)",
                    info="Where 'Subject in fine detail' takes over: 1 = from the first step, 0 = never. Higher "
                         "gives the style more room, lower keeps more of the subject's shape.")
                c["candidates"] = gr.Slider(
                    1, MAX_CANDIDATES, value=family_defaults(base.family).candidates, step=1,
                    label="Candidates per image",
                    info="Each image is the best of this many, picked by your own adapters (the one each adapter "
                         "denoises better than the base model does). Every candidate costs a whole generation.")
            with gr.Row():
                c["gen_btn"] = gr.Button("Generate", variant="primary")
                c["gen_cancel"] = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=1):
            c["gen_gallery"] = gr.Gallery(label="Images (PNG)", columns=4, height=360, format="png",
                                          object_fit="contain", elem_id="gen_gallery")
            c["gen_note"] = gr.Markdown(elem_id="gen_note")
            c["gen_status"] = gr.Markdown(elem_id="gen_status")
            c["gen_files"] = gr.File(label="Download PNGs", file_count="multiple", interactive=False)


def _compare_tab(c: dict, base: BaseModel) -> None:
    gr.Markdown("One prompt and seed through the base model, each adapter alone, the direct merge and what Generate "
                "uses (the learned merge, or K-LoRA), one candidate per image (the columns compare the adapters, not "
                "the picking)."
                + (" Scores come from the offline evaluator (probability of the training subject/style and "
                   "feature similarity to the training images)." if base.is_mini else ""))
    with gr.Row():
        c["cmp_prompt"] = gr.Textbox(Settings().prompt, label="Prompt", scale=3)
        c["cmp_seed"] = gr.Number(0, precision=0, minimum=0, label="Seed", scale=1)
        c["cmp_steps"] = gr.Slider(1, 100, value=20, step=1, label="Steps", scale=1)
        c["cmp_n"] = gr.Slider(1, 4, value=2, step=1, label="Images per variant", scale=1)
    c["cmp_btn"] = gr.Button("Compare", variant="primary")
    c["cmp_gallery"] = gr.Gallery(label="Variants (one column each, one row per image)", columns=5, height="auto",
                                  format="png", object_fit="contain", fit_columns=False)
    c["cmp_scores"] = gr.Dataframe(label="Evaluator scores" if base.is_mini else "Variants", interactive=False,
                                   elem_id="cmp_scores")


def build_ui(base: BaseModel, secret: str, cache_ttl_s: float, bases: list[str] | None = None
             ) -> tuple[gr.Blocks, UI]:
    """The page. `secret` encrypts the session id kept in the browser; Gradio's cache (uploads, published copies)
    is swept every hour of files older than `cache_ttl_s`. `bases` names the operator's base models (the first is
    `base`, every new session's); a visitor picks one from that list only."""
    bases = bases or [base.spec]
    c: dict[str, Any] = {}
    with gr.Blocks(title="ZipQDoRA Studio", delete_cache=(min(3600, int(cache_ttl_s)), int(cache_ttl_s))) as demo:
        c["browser"] = gr.BrowserState(None, storage_key="zipq_session", secret=secret)
        c["session"] = gr.Textbox(visible=False, label="session")
        c["seen"] = gr.State(None)
        gr.Markdown(header_markdown())
        with gr.Row(equal_height=True):
            c["base"] = gr.Dropdown(bases, value=bases[0], label="Base model", interactive=len(bases) > 1, scale=1,
                                    elem_id="base", info="The model this session's adapters are made on; switching "
                                                         "keeps them, but one made on another base cannot be used.")
            c["base_status"] = gr.Markdown(describe_base(base, bases[0]), elem_id="base_status")
        with gr.Row(equal_height=True):
            c["ex_subject"] = gr.Dropdown(example_names("subject"), value=DEFAULT_SUBJECT_EXAMPLE,
                                          label="Example subject", scale=1)
            c["ex_style"] = gr.Dropdown(example_names("style"), value=DEFAULT_STYLE_EXAMPLE, label="Example style",
                                        scale=1)
            c["ex_btn"] = gr.Button("Load examples", scale=1)
            c["flow_btn"] = gr.Button("▶ Run whole flow", variant="primary", scale=1)
            c["flow_cancel"] = gr.Button("Cancel all", variant="stop", scale=1)
            c["new_btn"] = gr.Button("New session", scale=1)
        with gr.Row():
            c["flow_status"] = gr.Markdown(elem_id="flow_status")
            c["flow_gallery"] = gr.Gallery(label="Result", columns=4, height=160, format="png", object_fit="contain",
                                           visible=False, elem_id="flow_gallery")
        with gr.Tabs():
            with gr.Tab("Subject", id="subject"):
                _images_tab(c, "subject", base)
            with gr.Tab("Style", id="style"):
                _images_tab(c, "style", base)
            with gr.Tab("Train", id="train"):
                _train_tab(c, base)
            with gr.Tab("Merge", id="merge"):
                _merge_tab(c)
            with gr.Tab("Generate", id="generate"):
                _generate_tab(c, base)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(c, base)
        c["timer"] = gr.Timer(POLL_SECONDS)
    return demo, UI(c)


TRAIN_INPUTS = ("session", "train_which", "method", "quantize", "int8", "rank", "steps", "style_steps", "lr",
                "lr_schedule", "resolution", "prior", "previews")
GEN_INPUTS = ("session", "prompt", "negative", "seed", "gen_steps", "guidance", "width", "height", "num_images",
              "subject_strength", "style_strength", "subject_detail", "handoff", "candidates")
BASE_TARGETS = ("base", "base_status", "steps", "style_steps", "rank", "lr", "lr_schedule", "resolution", "width",
                "height", "candidates", "family_note")
POLL_TARGETS = ("train_status", "subject_plot", "style_plot", "train_samples", "subject_dl", "style_dl",
                "merge_status", "merge_plot", "merged_dl", "flow_status", "flow_gallery", "gen_status",
                *BASE_TARGETS[1:], "seen")
SESSION_TARGETS = ("session", "browser", "subject_gallery", "subject_notes", "style_gallery", "style_notes",
                   "subject_token", "subject_noun", "style_token", "style_noun", "prompt", "seen", *BASE_TARGETS)
EXAMPLE_TARGETS = ("subject_gallery", "subject_notes", "subject_token", "subject_noun", "style_gallery",
                   "style_notes", "style_token", "style_noun", "prompt")


def wire(demo: gr.Blocks, ui: UI, h: Handlers) -> None:
    """Connect events; the named ones (api_name) are the scripting API, pinned by tests/studio/test_api.py."""
    with demo:
        demo.load(h.restore, ui("browser"), ui(*SESSION_TARGETS), api_visibility="private")
        ui["new_btn"].click(h.fresh_session, None, ui(*SESSION_TARGETS), api_visibility="private")
        gr.api(h.new_session, api_name="new_session")
        ui["base"].input(h.choose_base, ui("session", "base"), ui(*BASE_TARGETS, "subject_noun"),
                         api_name="choose_base")
        ui["timer"].tick(h.poll, ui("session", "seen", "merge_method"), ui(*POLL_TARGETS), show_progress="hidden",
                         api_visibility="private", queue=False)
        for kind in ("subject", "style"):
            ui[f"{kind}_use"].click(
                getattr(h, f"prepare_{kind}"), ui("session", f"{kind}_files", f"{kind}_token", f"{kind}_noun"),
                ui(f"{kind}_gallery", f"{kind}_notes", f"{kind}_noun", "prompt"), api_name=f"prepare_{kind}")
        words = ui("session", "subject_token", "subject_noun", "style_token", "style_noun")
        for name in ("subject_token", "subject_noun", "style_token", "style_noun"):
            ui[name].input(h.remember_words, words, ui("prompt"), api_visibility="private", show_progress="hidden")
        ui["ex_btn"].click(h.load_examples, ui("session", "ex_subject", "ex_style"), ui(*EXAMPLE_TARGETS),
                           api_name="load_examples")
        ui["flow_btn"].click(h.run_flow, ui("session", "ex_subject", "ex_style", "steps", "style_steps",
                                            "merge_method", "merge_steps", "prompt", "seed"),
                             ui(*EXAMPLE_TARGETS, "flow_status"), api_name="run_flow")
        ui["flow_cancel"].click(lambda s: h.cancel(s, "all"), ui("session"), ui("flow_status"),
                                api_visibility="private")
        ui["train_btn"].click(h.train, ui(*TRAIN_INPUTS), ui("train_msg"), api_name="train")
        ui["import_btn"].click(h.import_adapter, ui("session", "import_kind", "import_files"), ui("train_msg"),
                               api_name="import_adapter")
        ui["resume_btn"].click(h.resume, ui(*TRAIN_INPUTS), ui("train_msg"), api_name="resume")
        ui["train_cancel"].click(lambda s: h.cancel(s, "train"), ui("session"), ui("train_msg"),
                                 api_visibility="private")
        gr.api(h.cancel, api_name="cancel")
        ui["merge_btn"].click(h.merge, ui("session", "merge_method", "lam", "merge_steps", "merge_subject_w",
                                          "merge_style_w", "density", "keep_subject"), ui("merge_msg"),
                              api_name="merge")
        ui["train_format"].input(h.train_format, ui("session", "train_format"), ui("subject_dl", "style_dl"),
                                 api_name="train_format")
        ui["merged_format"].input(h.merged_format, ui("session", "merged_format", "merge_method"), ui("merged_dl"),
                                  api_name="merged_format")
        ui["merge_method"].change(h.merge_method_note, ui("session", "merge_method"), ui("merged_dl", "merge_msg"),
                                  api_visibility="private", show_progress="hidden")
        ui["merge_cancel"].click(lambda s: h.cancel(s, "merge"), ui("session"), ui("merge_msg"),
                                 api_visibility="private")
        ui["prompt"].change(lambda p: p, ui("prompt"), ui("cmp_prompt"), api_visibility="private",
                            show_progress="hidden")
        ui["dice"].click(lambda: random.randrange(2**31), None, ui("seed"), api_visibility="private",
                         show_progress="hidden")
        # Generation and comparison wait on their jobs (the registry takes turns on the model), so they need no
        # Gradio concurrency limit of their own.
        ui["gen_btn"].click(h.generate, ui(*GEN_INPUTS), ui("gen_gallery", "gen_files", "gen_note"),
                            api_name="generate", concurrency_limit=None)
        ui["gen_cancel"].click(lambda s: h.cancel(s, "generate"), ui("session"), ui("gen_note"),
                               api_visibility="private")
        ui["cmp_btn"].click(h.compare, ui("session", "cmp_prompt", "cmp_seed", "cmp_steps", "cmp_n"),
                            ui("cmp_gallery", "cmp_scores"), api_name="compare", concurrency_limit=None)
        gr.api(h.job_status, api_name="job_status")
