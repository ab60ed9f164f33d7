"""Eval corpora: documents from files, cut into BOS-first token sequences, batched.

A corpus is a sequence of documents: a folder (every regular, non-hidden file below it,
sorted by path, one document each; symlinks to a file already read are skipped), a single
file, an iterable of strings, or a Hugging Face ``datasets`` dataset (its ``text``
column; ``datasets`` itself is never imported here).

Each document is tokenized on its own and cut into sequences of ``seq_len``: BOS, then the
next ``seq_len - 1`` tokens of the document (so every sequence starts at BOS, as Gemma
Scope's training contexts do). A document's last short piece is kept, right-padded with
``pad_id`` (Gemma's 0), so short documents count; ``interventions.positions_from_padding``
marks those pads as padding. Reading stops after ``tokens`` non-padding tokens (BOS
included), cutting the last sequence to fit.

Nothing here imports a neural-network framework (numpy only).
"""

from __future__ import annotations

import itertools
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

DEBIAN_LICENSES = Path("/usr/share/common-licenses")


def _files(folder: Path) -> list[Path]:
  seen, out = set(), []
  for p in sorted(folder.rglob("*")):
    if any(part.startswith(".") for part in p.relative_to(folder).parts) or not p.is_file():
      continue
    real = p.resolve()
    if real not in seen:
      seen.add(real)
      out.append(p)
  return out


def documents(corpus) -> Iterator[str]:
  """The documents of ``corpus`` (a folder, a file, strings, or a ``datasets`` dataset).

  Raises:
    FileNotFoundError: a path that does not exist.
    TypeError: anything else (a bare string that is not a path is refused: pass
      ``[text]`` for one document).
  """
  if isinstance(corpus, (str, os.PathLike)):
    p = Path(corpus)
    if not p.exists():
      raise FileNotFoundError(f"corpus {str(corpus)!r} does not exist (pass a folder of text "
                              "files, a file, or a list of strings)")
    for f in (_files(p) if p.is_dir() else [p]):
      yield f.read_text(encoding="utf-8", errors="replace")
    return
  if "text" in (getattr(corpus, "column_names", None) or ()):
    for row in corpus:
      yield row["text"]
    return
  if not isinstance(corpus, Iterable):
    raise TypeError(f"a corpus is a folder, a file or an iterable of strings, not "
                    f"{type(corpus).__name__}")
  for i, doc in enumerate(corpus):
    if not isinstance(doc, str):
      raise TypeError(f"corpus document {i} is a {type(doc).__name__}, not a string")
    yield doc


def sequences(tokenizer, docs: Iterable[str], seq_len: int, *, tokens: int | None = None,
              pad_id: int = 0) -> Iterator[np.ndarray]:
  """int32 rows (seq_len,): BOS + up to seq_len - 1 tokens of one document, right-padded.

  ``tokenizer`` needs ``encode(text, add_bos=False)`` and ``bos_id``. Stops after
  ``tokens`` non-padding tokens (None: the whole corpus).
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2 (BOS + one token), got {seq_len}")
  if tokens is not None and tokens < 2:
    raise ValueError(f"tokens must be at least 2, got {tokens}")
  bos = int(getattr(tokenizer, "bos_id", 2))
  left = tokens
  for doc in docs:
    ids = tokenizer.encode(doc, add_bos=False)
    for start in range(0, len(ids), seq_len - 1):
      piece = [bos] + list(ids[start:start + seq_len - 1])
      if left is not None:
        piece = piece[:left]
        left -= len(piece)
      if len(piece) < 2:
        return
      row = np.full(seq_len, pad_id, np.int32)
      row[:len(piece)] = piece
      yield row
      if left is not None and left <= 1:
        return


def batches(rows: Iterable[np.ndarray], batch_size: int, seq_len: int, *,
            pad_id: int = 0) -> Iterator[tuple[np.ndarray, int]]:
  """``(tokens (batch_size, seq_len) int32, rows filled)``: one compiled shape; the last
  batch is filled up with all-padding rows (nothing in them counts)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  it = iter(rows)
  while True:
    got = [r for _, r in zip(range(batch_size), it)]
    if not got:
      return
    out = np.full((batch_size, seq_len), pad_id, np.int32)
    out[:len(got)] = np.stack(got)
    yield out, len(got)


def pydoc_documents() -> list[str]:
  """Python's own reference text (``pydoc_data.topics``), one document per topic."""
  from pydoc_data import topics
  return [topics.topics[k] for k in sorted(topics.topics)]


def stdlib_documents() -> list[str]:
  """The running Python's standard-library modules (the top-level ``*.py`` files of
  ``sysconfig``'s stdlib folder, sorted): real code, shipped wherever Python is."""
  folder = Path(sysconfig.get_paths()["stdlib"])
  return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(folder.glob("*.py"))
          if f.is_file()]


def _interleave(*lists: list[str]) -> list[str]:
  out = []
  for group in itertools.zip_longest(*lists):
    out += [doc for doc in group if doc is not None]
  return out


def default_corpus() -> tuple[str, list[str]]:
  """``(name, documents)``: English prose and code, one document from each in turn (so any
  token budget sees both): the licence texts Debian's ``base-files`` ships in
  /usr/share/common-licenses (about 50k tokens; Python's pydoc topics where that folder is
  missing), and the Python standard library's modules (``stdlib_documents``, about 1.3M
  tokens)."""
  if DEBIAN_LICENSES.is_dir() and _files(DEBIAN_LICENSES):
    prose_name, prose = "debian-licenses", list(documents(DEBIAN_LICENSES))
  else:
    prose_name, prose = "pydoc", pydoc_documents()
  code = stdlib_documents()
  if not code:
    return prose_name, prose
  return f"{prose_name}+python-stdlib", _interleave(prose, code)


def from_argument(arg: str | None) -> tuple[str, object]:
  """``(name, corpus)`` for a command's ``--corpus``: None or "" the default corpus
  (``default_corpus``), "pydoc" Python's reference text, "stdlib" Python's standard
  library, else a folder or file path.

  Raises:
    FileNotFoundError: a path that does not exist (the message names what may be given).
  """
  if arg in (None, ""):
    return default_corpus()
  if arg == "pydoc":
    return "pydoc", pydoc_documents()
  if arg == "stdlib":
    return "python-stdlib", stdlib_documents()
  if not Path(arg).exists():
    raise FileNotFoundError(f"--corpus {arg} does not exist (a folder of text files, a file, "
                            "'pydoc' or 'stdlib')")
  return arg, arg
