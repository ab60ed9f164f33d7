"""Gemma 3 from an orbax checkpoint written by Google's ``gemma`` package (Kaggle's flax).

A Kaggle download (``google/gemma-3/flax/...``) such as ``gemma3-1b`` is a folder holding
``tokenizer.model`` and the orbax checkpoint folder ``gemma3-1b/`` (``_METADATA``, ``manifest.ocdbt``, ``d/``, ...).
Either folder can be given. The checkpoint is restored with orbax as numpy arrays, in the
FLAT layout (``{"transformer/layer_0/attn/q_einsum": {"w": ...}}``) or any other layout
``dictlearn_gemma.params.normalize_gemma_params`` knows (the NESTED one of ``model.init()``
included); Kauldron checkpoints keep the params in a ``default/`` subfolder. orbax is
imported only when a checkpoint is read.
"""

from __future__ import annotations

import os

import numpy as np

from dictlearn_gemma.params import normalize_gemma_params

_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "checkpoint")


def is_orbax_checkpoint(folder: str) -> bool:
  return os.path.isdir(folder) and any(
      os.path.exists(os.path.join(folder, m)) for m in _ORBAX_MARKERS)


def find_checkpoint(folder: str) -> str:
  """The orbax checkpoint folder at or directly below ``folder``.

  Raises:
    FileNotFoundError: when there is none, or more than one to choose from.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"no checkpoint folder at {folder!r}")
  if is_orbax_checkpoint(folder):
    default = os.path.join(folder, "default")  # Kauldron: params in default/.
    return default if is_orbax_checkpoint(default) else folder
  found = sorted(os.path.join(folder, d) for d in os.listdir(folder)
                 if is_orbax_checkpoint(os.path.join(folder, d)))
  if len(found) == 1:
    return find_checkpoint(found[0])
  if not found:
    raise FileNotFoundError(f"{folder!r} holds no orbax checkpoint (a folder with _METADATA or "
                            "manifest.ocdbt); pass the Kaggle download folder or the checkpoint")
  raise FileNotFoundError(f"{folder!r} holds several checkpoints ({', '.join(found)}); "
                          "pass the one to load")


def find_tokenizer(checkpoint: str) -> str | None:
  """``tokenizer.model`` in the checkpoint folder or up to two folders above it."""
  folder = os.path.abspath(checkpoint)
  for _ in range(3):
    path = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(path):
      return path
    folder = os.path.dirname(folder)
  return None


def load_orbax_params(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """Canonical params (numpy, checkpoint dtype) from an orbax Gemma checkpoint folder."""
  return normalize_gemma_params(read_orbax_tree(folder))


def read_orbax_tree(folder: str | os.PathLike) -> dict:
  """The restored tree of an orbax Gemma checkpoint folder (numpy), as saved: text and, for
  4B+, the vision tensors (``dictlearn_gemma.load_vision`` reads those)."""
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError("reading Gemma orbax checkpoints needs orbax-checkpoint: "
                      "pip install 'dictlearn[gemma]'") from e
  import jax

  path = os.path.abspath(find_checkpoint(os.fspath(folder)))
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    # Restore as host numpy arrays: the saved shardings name the saving machine's devices.
    meta = checkpointer.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # orbax raises many kinds; say which folder and what it should be.
    raise ValueError(f"could not restore the orbax checkpoint {path!r}: {e}") from e
  if not isinstance(tree, dict):
    raise ValueError(f"{path!r} does not hold a parameter dict (got {type(tree).__name__})")
  return tree
