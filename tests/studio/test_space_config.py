"""The Space's settings: README.md's front matter (what Spaces read) and space.yaml say the same things."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "python_version",
            "suggested_hardware", "pinned", "license")


def front_matter(text: str) -> dict:
    """The YAML block between the first two '---' lines, which must open the file."""
    lines = text.splitlines()
    assert lines[0] == "---", "README.md must start with the Space's YAML front matter ('---' on line 1)"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


def test_readme_front_matter_equals_space_yaml():
    readme = front_matter((ROOT / "README.md").read_text(encoding="utf-8"))
    space = yaml.safe_load((ROOT / "space.yaml").read_text(encoding="utf-8"))
    assert readme == space


def test_space_config_is_complete_and_true():
    space = yaml.safe_load((ROOT / "space.yaml").read_text(encoding="utf-8"))
    assert all(k in space for k in REQUIRED), [k for k in REQUIRED if k not in space]
    assert space["sdk"] == "gradio" and (ROOT / space["app_file"]).exists()
    assert isinstance(space["python_version"], str)  # 3.10 unquoted would read as 3.1
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["gradio"] == space["sdk_version"]
