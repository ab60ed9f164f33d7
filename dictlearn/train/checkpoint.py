"""Checkpoints: the dictionary in the Gemma Scope 2 layout, plus the exact training state.

One folder per checkpoint, written whole under a temporary name and renamed into place, so
a crash never leaves a half-written checkpoint that looks complete::

    <checkpoint_dir>/step_00001000/
      params.safetensors, config.json    the dictionary on raw activations (dictlearn.io.save;
                                         loads with dictlearn.load)
      train_state.safetensors            every leaf of the training state, float32/int32:
                                         normalised parameters, Adam moments, counters
      train_state.json                   step, seed, config, normalisation scales, history

The dictionary alone cannot restart training exactly (its weights have the normalisation
folded in, which does not round-trip bit for bit, and it lacks the log-thresholds and
Adam's moments), hence the separate train state. No pickle: leaves are named by their
pytree path and restored into a template of the same structure.

With several processes (``jax.distributed``) the checkpoint folder must be on a filesystem
they all see: every process gathers the state (a collective), process 0 alone writes,
and all wait for one another before and after, so none reads a half-written folder or
runs ahead of one that is still writing. A checkpoint holds whole arrays, so it resumes
with any process count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np

from dictlearn import distributed

STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(checkpoint_dir, step: int) -> Path:
  return Path(checkpoint_dir) / f"step_{step:08d}"


def latest_checkpoint(checkpoint_dir) -> Path | None:
  """The complete checkpoint folder with the highest step, or None."""
  root = Path(checkpoint_dir)
  if not root.is_dir():
    return None
  best = None
  for p in root.iterdir():
    m = _STEP_DIR.match(p.name)
    if m and (p / STATE_JSON).exists() and (p / STATE_FILE).exists():
      if best is None or int(m.group(1)) > best[0]:
        best = (int(m.group(1)), p)
  return best[1] if best else None


def _leaf_names(tree) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


def save_checkpoint(checkpoint_dir, step: int, *, dictionary, state, info: dict,
                    keep: int = 2) -> Path:
  """Writes checkpoint ``step`` and deletes all but the newest ``keep`` checkpoints (on
  process 0; every process of a many-process run calls it)."""
  final = step_dir(checkpoint_dir, step)
  state = distributed.gather_tree(state)  # Collective: every process takes part.
  distributed.barrier(f"dictlearn checkpoint {step}: start")
  if distributed.is_primary():
    _write(final, checkpoint_dir, dictionary, state, info, step, keep)
  distributed.barrier(f"dictlearn checkpoint {step}: written")
  return final


def _write(final: Path, checkpoint_dir, dictionary, state, info: dict, step: int, keep: int):
  from safetensors.numpy import save_file

  from dictlearn import io

  tmp = final.with_name(final.name + f".tmp{os.getpid()}")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  io.save(dictionary, tmp)
  leaves = jax.tree_util.tree_leaves(state)
  names = _leaf_names(state)
  save_file({n: np.asarray(jax.device_get(a)) for n, a in zip(names, leaves)},
            str(tmp / STATE_FILE))
  (tmp / STATE_JSON).write_text(json.dumps(dict(info, step=step, leaves=names), indent=1))
  if final.exists():
    shutil.rmtree(final)
  os.replace(tmp, final)
  if keep:
    old = sorted(p for p in Path(checkpoint_dir).iterdir()
                 if _STEP_DIR.match(p.name) and p != final)
    for p in old[:max(0, len(old) - (keep - 1))]:
      shutil.rmtree(p, ignore_errors=True)


def read_info(folder) -> dict:
  """The checkpoint's train_state.json: step, config, scales, history."""
  return json.loads((Path(folder) / STATE_JSON).read_text())


def load_checkpoint(folder, template):
  """(state, info) from a checkpoint folder; ``template`` gives the pytree structure
  (arrays or ShapeDtypeStructs) and every leaf's shape and dtype is checked against it."""
  from safetensors.numpy import load_file

  folder = Path(folder)
  info = read_info(folder)
  arrays = load_file(str(folder / STATE_FILE))
  names = _leaf_names(template)
  leaves, treedef = jax.tree_util.tree_flatten(template)
  missing = [n for n in names if n not in arrays]
  if missing:
    raise ValueError(
        f"{folder}: the training state lacks {missing[:5]}; it was written by a different "
        "configuration (or version); train into a fresh checkpoint_dir")
  out = []
  for n, t in zip(names, leaves):
    a = arrays[n]
    if a.shape != tuple(t.shape) or a.dtype != np.dtype(t.dtype):
      raise ValueError(
          f"{folder}: {n} is {a.shape} {a.dtype} but this run needs {tuple(t.shape)} "
          f"{np.dtype(t.dtype)}; the checkpoint is from a different configuration")
    out.append(a)
  return jax.tree_util.tree_unflatten(treedef, out), info
