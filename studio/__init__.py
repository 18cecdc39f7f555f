"""The Gradio shell of ZipQDoRA Studio, over the core in `zipq_core`:

- `sessions`: a visitor's folder, settings, uploads and disk quota (no gradio);
- `flow`: what a visitor does — uploads, training, merging, generating, the whole flow — as jobs (no gradio);
- `handlers`: form values → flow calls → what components show, errors → messages;
- `page`: the layout and its events;
- `launch`: flags, `create_app`, `main` (app.py calls it).
"""
