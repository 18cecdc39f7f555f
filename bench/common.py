"""What every benchmark shares: JSON on stdout and, with --out, in a file."""

from __future__ import annotations

import json
from pathlib import Path


def emit_json(result: dict, out: Path | None) -> None:
    """Print the result as JSON and write the same text to `out` when given."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        out.write_text(text)
