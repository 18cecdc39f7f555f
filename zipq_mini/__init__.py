"""The offline world that stands in for the internet: what tests, examples, benchmarks and the app's offline
judge use, and what training, merging, generating and exporting on a real model never need.

- `world`: a procedural renderer of subjects (shapes) in styles (textures), with captions;
- `pipeline`: the `mini` SDXL-architecture pipeline's shapes, build / save / load (recipe: scripts/train_mini.py);
- `evaluator`: the classifier that scores images of the world (recipe: scripts/train_evaluator.py);
- `concepts`: subjects and styles drawn from continuous families, in a tuning and a test split (issue 19);
- `judge`: the label-free judge of subject and style fidelity (recipe: scripts/train_judge.py).

Nothing is imported here: `from zipq_mini import world` loads just that module.
"""
