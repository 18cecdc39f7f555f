"""The scripting API as `gradio_client` sees it, pinned: the named endpoints, their parameters (name, type,
default) and how many values each returns. A change here is a change for every script that drives the studio:
make it on purpose, then update api.json (`python tests/studio/test_api.py URL` prints the current one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).with_name("api.json")


def api_shape(client) -> dict:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    return {name: {"parameters": [[p["parameter_name"], (p.get("python_type") or {}).get("type"),
                                   p.get("parameter_default")] for p in spec["parameters"]],
                   "returns": len(spec["returns"])}
            for name, spec in sorted(api.items())}


def test_the_named_endpoints_are_as_pinned(launched_app):
    from gradio_client import Client

    shape = api_shape(Client(launched_app[0], verbose=False))
    assert shape == json.loads(GOLDEN.read_text())


if __name__ == "__main__":
    from gradio_client import Client

    print(json.dumps(api_shape(Client(sys.argv[1], verbose=False)), indent=1))
