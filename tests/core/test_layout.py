"""The layout's promises: the product never needs the offline world, its packages import each other without a cycle
(imports inside functions included), and `--help` loads no torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("zipq_core", "studio")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module of `modules` that `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from . import x` may name a module
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found - {name}


def graph(roots: tuple[str, ...]) -> dict[str, set[str]]:
    files = [p for r in roots for p in (ROOT / r).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_product_packages():
    edges = graph(PRODUCT)
    assert len(edges) > 20
    # A package's __init__ that re-exports its modules is not a cycle with them; a module importing its own
    # package's __init__ (and through it a sibling that imports it back) would be.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    assert find_cycle(edges) is None, find_cycle(edges)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_the_studio_and_only_the_evaluate_command_the_offline_world():
    edges = graph(("zipq_core",))
    full = graph(("zipq_core", "zipq_mini", "studio"))
    core = {m: full[m] for m in edges}
    assert not any(t.startswith("studio") for ts in core.values() for t in ts)
    users = sorted(m for m, ts in core.items() if any(t.startswith("zipq_mini") for t in ts))
    assert users == ["zipq_core.cli"], users  # `python -m zipq_core evaluate` scores images of the offline world


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_imports_no_torch():
    code = ("import sys\nfrom zipq_core.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['generate', '--help'], ['merge', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "import zipq_core\nassert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.slow
def test_train_merge_generate_export_on_a_tiny_sdxl_import_no_offline_world(tiny_sdxl_dir, subject_dir, tmp_path):
    code = f"""
import sys
from pathlib import Path
from zipq_core import GenerateConfig, MergeConfig, TrainConfig, generate, load_base, merge_adapters, train_adapter
from zipq_core import prepare_images, DataConfig
from zipq_core.adapters.kohya import export_kohya
from zipq_core.adapters import load_adapter
from zipq_core.merge import slider_adapters
base = load_base({str(tiny_sdxl_dir)!r})
out = Path({str(tmp_path)!r})
for kind, token in (("subject", "sks"), ("style", "zkz")):
    cfg = TrainConfig(kind=kind, token=token, steps=2, resolution=64)
    images = prepare_images({str(subject_dir)!r}, cfg.instance_prompt, DataConfig(), token=token)
    list(train_adapter(base, images, cfg, out / kind))
list(merge_adapters(base, out / "subject", out / "style", MergeConfig(steps=2), out / "merged"))
generate(base, GenerateConfig(prompt="a photo of sks", steps=2, candidates=2), slider_adapters(out / "merged", 1, 1))
export_kohya(load_adapter(out / "merged"), base, out / "merged.safetensors")
offline = sorted(m for m in sys.modules if m.startswith(("zipq_mini", "studio")))
assert not offline, offline
print("ok")
"""
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _first_line_importing(tree: ast.Module, prefixes: tuple[str, ...]) -> int | None:
    lines = [node.lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
             and any((n.name if isinstance(node, ast.Import) else node.module or "").split(".")[0] in prefixes
                     for n in node.names)]
    return min(lines, default=None)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "common.py"))
def test_every_benchmark_puts_the_checkout_on_the_path_before_importing_it(script):
    """`python bench/<name>.py` runs from a fresh checkout: bench/common.py (which puts the checkout on sys.path) is
    imported before any of the project's packages, at the module's top level."""
    tree = ast.parse((ROOT / "bench" / script).read_text())
    project = _first_line_importing(tree, ("zipq_core", "zipq_mini", "studio"))
    common = _first_line_importing(tree, ("common",))
    assert project is None or (common is not None and common < project), script


def test_test_modules_have_unique_names():
    """pytest imports test modules by their base name (no packages under tests/): two files of one name in different
    folders stop the whole collection."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
