"""Writes the held-out text the demo dictionaries are scored on (none of it trained them).

  python scripts/heldout_corpus.py OUT_DIR

The default corpus (Debian's licence texts and the Python standard library) trains them;
this is prose and code from elsewhere on the machine: the first 60 README and .txt files
under /usr/share/doc (sorted by path, at least 500 bytes) and the first 20 modules of
numpy's ``lib`` package, one document each, interleaved (file names keep the order).
"""

import sys
from pathlib import Path

import numpy


def main(out: str) -> None:
  docs = sorted(p for p in Path("/usr/share/doc").rglob("*") if p.is_file() and (
      p.name.startswith("README") or p.suffix == ".txt") and p.suffix != ".gz"
      and p.stat().st_size >= 500)[:60]
  code = sorted(p for p in (Path(numpy.__file__).parent / "lib").glob("*.py")
                if p.name != "__init__.py")[:20]
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  order = []
  for i in range(max(len(docs), len(code))):
    order += [p for p in (docs[i] if i < len(docs) else None,
                          code[i] if i < len(code) else None) if p is not None]
  for i, p in enumerate(order):
    (out / f"{i:03d}_{p.name}.txt").write_text(p.read_text(errors="replace"))
  print(f"{len(docs)} prose files and {len(code)} code files in {out}")


if __name__ == "__main__":
  main(sys.argv[1])
