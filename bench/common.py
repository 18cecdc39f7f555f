"""What every benchmark shares: the checkout on the import path, and JSON on stdout (and, with --out, in a file).

Every benchmark imports this module first, so `python bench/<name>.py` runs from a checkout without
installing the package or setting PYTHONPATH.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def emit_json(result: dict, out: Path | None) -> None:
    """Print the result as JSON and write the same text to `out` when given."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        out.write_text(text)
