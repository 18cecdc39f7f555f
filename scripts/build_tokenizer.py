"""Build the CLIP tokenizer files (vocab.json + merges.txt) in assets/tokenizer/ from open_clip's BPE table.

transformers ships no CLIP vocabulary; the real one (49,408 tokens) is `bpe_simple_vocab_16e6.txt.gz` inside
the open_clip_torch wheel. Run once (needs only the wheel, not open_clip's dependencies):

    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc && unzip -o /tmp/oc/*.whl 'open_clip/*.gz' -d /tmp/oc
    python scripts/build_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table (the first 256 vocabulary entries)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build(bpe_gz: Path, out_dir: Path) -> int:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # CLIP keeps 48,894 merges
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
    return len(vocab)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "tokenizer")
    print(build(parser.parse_args().bpe_gz, parser.parse_args().out))
