"""Runs over many processes (``jax.distributed``): start-up, who reads what, reductions.

Every process runs the same program on the same arguments (SPMD, one process per host or
per GPU); the functions here are no-ops, or the plain single-process operation, when
there is one process, so callers need no separate code path.

- :func:`initialize` before any other JAX call: explicit coordinator / process count /
  process id, or JAX's own detection (Cloud TPU pods, SLURM, Open MPI) when they are not
  given; one process when nothing is detected. :func:`add_cli_flags` and
  :func:`init_from_args` give commands one flag set for it.
- Data: :func:`process_block` splits ``range(n)`` into one contiguous block per process
  (harvesting: the blocks, concatenated in process order, are the single-process order);
  :func:`local_rows` and :func:`global_batch` build a global batch from the rows this
  process's devices hold, so no process reads the whole batch.
- :func:`put` places identical host values on every process (replicated or sharded);
  :func:`gather_tree` reads global arrays back to the host on every process.
- :func:`allgather` (exact for any dtype: float64 travels as bytes, not through float32)
  and :func:`allreduce_sum` for host values; :func:`reduce_corpus_eval` merges the
  accumulators of ``dictlearn.evals.CorpusEval`` so every process holds the global sums.
- :func:`barrier`, :func:`is_primary` (process 0 writes shared files).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from jax.sharding import Sharding

# ------------------------------------------------------------------------- start-up


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> int:
  """Joins the run's processes (``jax.distributed.initialize``); returns the process count.

  Call it first, before any JAX computation or device query. With ``coordinator``
  ("host:port" of process 0), ``num_processes`` and ``process_id`` all given, they are
  used; with none given, JAX detects a cluster (TPU pod slice, SLURM ``srun``, Open MPI)
  and a plain machine stays one process. ``num_processes=1`` alone is one process. Calling
  it again after a successful start is a no-op.

  On CPU the cross-process collectives use gloo (set here before the start: without a
  CPU collectives implementation XLA cannot run a computation spanning processes).

  Raises:
    ValueError: only some of the three settings given.
    RuntimeError: settings given but JAX has already started (a device query or a
      computation ran first).
  """
  if jax.distributed.is_initialized():
    return jax.process_count()
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if num_processes == 1 and coordinator is None:
    return 1
  if any(given) and not all(given):
    raise ValueError("pass all of coordinator, num_processes and process_id (or none, to "
                     f"let JAX detect the cluster); got coordinator={coordinator!r}, "
                     f"num_processes={num_processes!r}, process_id={process_id!r}")
  _cpu_collectives()
  if all(given):
    jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
    return jax.process_count()
  try:
    jax.distributed.initialize()
  except ValueError as e:
    # JAX's detection found no cluster: it asks for a coordinator. Anything else (a
    # cluster found but misconfigured) is a real error.
    if "coordinator_address" not in str(e):
      raise
    return 1
  except RuntimeError:
    # JAX already started in this process (e.g. a command called from Python after
    # other JAX work): too late to join a cluster, so this is a one-process run.
    return 1
  return jax.process_count()


def _cpu_collectives():
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # An older JAX without the option: its default.
    pass


def add_cli_flags(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds ``--coordinator HOST:PORT --num-processes N --process-id I`` to a parser."""
  g = ap.add_argument_group(
      "many processes", "jax.distributed: give all three, or none to let JAX detect a TPU "
      "pod slice or a SLURM job (one process per host / per GPU)")
  g.add_argument("--coordinator", help="HOST:PORT of process 0")
  g.add_argument("--num-processes", type=int, help="how many processes take part")
  g.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
  return ap


def init_from_args(args: argparse.Namespace) -> int:
  """:func:`initialize` from the flags of :func:`add_cli_flags`; the process count."""
  return initialize(args.coordinator, args.num_processes, args.process_id)


# ------------------------------------------------------------------- who is who


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_primary() -> bool:
  """True on process 0, the one that writes files every process shares."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)`` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- data


def process_block(n: int, *, align: int = 1, index: int | None = None,
                  count: int | None = None) -> tuple[int, int]:
  """``(start, stop)``: this process's contiguous block of ``range(n)``.

  The blocks of processes 0, 1, ... are consecutive and cover ``range(n)``; their
  boundaries are multiples of ``align`` (so batches of ``align`` items are cut exactly
  as one process would cut them), and their sizes differ by at most one ``align``.
  """
  index = jax.process_index() if index is None else int(index)
  count = jax.process_count() if count is None else int(count)
  units = -(-int(n) // int(align))
  lo, hi = units * index // count, units * (index + 1) // count
  return min(lo * align, n), min(hi * align, n)


def local_rows(sharding: Sharding, shape: tuple[int, ...]) -> np.ndarray:
  """Sorted positions (k,) int64 along axis 0 of a global ``shape`` array that this
  process's devices hold under ``sharding`` (each once, though several devices may hold
  a row: replicas over other mesh axes)."""
  held = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    held.update(range(*index[0].indices(shape[0])))
  return np.asarray(sorted(held), np.int64)


def global_batch(local: np.ndarray, rows: np.ndarray, sharding: Sharding,
                 n: int) -> jax.Array:
  """The global (n, ...) array whose rows ``rows`` (from :func:`local_rows`) are
  ``local`` (len(rows), ...), placed with ``sharding``; each process passes its own."""
  local = np.asarray(local)
  shape = (int(n), *local.shape[1:])

  def block(index):
    pos = np.arange(shape[0])[index[0]]
    return local[np.searchsorted(rows, pos)][(slice(None), *index[1:])]

  return jax.make_array_from_callback(shape, sharding, block)


def put(tree, shardings):
  """``jax.device_put(tree, shardings)`` for values that are equal on every process
  (host arrays, or arrays on this process's devices; PRNG keys too)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if isinstance(shardings, Sharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

  def one(a, sh):
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      # Key arrays cannot be placed across processes; their raw words can.
      return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(a), sh),
                                      impl=jax.random.key_impl(a))
    host = np.asarray(jax.device_get(a))
    return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])

  return jax.tree_util.tree_map(one, tree, shardings)


def gather_tree(tree):
  """``tree`` readable on this process: returned as is with one process (or when every
  leaf is already fully addressable), else as numpy copies of the global values.

  Collective when some leaf is split over other processes' devices: every process must
  call it at the same point.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  if jax.process_count() == 1 or all(getattr(a, "is_fully_addressable", True)
                                     for a in leaves):
    return tree
  from jax.experimental import multihost_utils

  def one(a):
    if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
      return np.asarray(jax.device_get(a) if isinstance(a, jax.Array) else a)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))

  return jax.tree_util.tree_map(one, tree)


# --------------------------------------------------------------------- reductions


def allgather(a) -> np.ndarray:
  """(process_count, *a.shape): every process's ``a`` (same shape and dtype on each),
  in process order, exactly (the bytes travel, so float64 and int64 keep every bit)."""
  a = np.asarray(a)
  if jax.process_count() == 1:
    return a[None]
  from jax.experimental import multihost_utils
  raw = np.ascontiguousarray(a.reshape(-1)).view(np.uint8)
  got = np.asarray(multihost_utils.process_allgather(raw))  # (P, nbytes)
  return np.ascontiguousarray(got).view(a.dtype).reshape(-1, *a.shape)


def allreduce_sum(tree):
  """Every leaf (host arrays or numbers) summed over processes, in process order, so
  every process gets the same bits. Floats are summed in float64, ints in int64."""
  def one(v):
    a = np.asarray(v)
    wide = np.float64 if np.issubdtype(a.dtype, np.floating) else np.int64
    total = allgather(a.astype(wide)).sum(axis=0)
    return total if a.ndim else total.item()
  return jax.tree_util.tree_map(one, tree)


def reduce_corpus_eval(ev) -> None:
  """Merges a ``dictlearn.evals.CorpusEval`` over processes, in place: afterwards every
  process holds the sums of all processes' batches (``ev.results()`` is the global
  result). Loss sums and counts add; per-feature means and centred sums of squares are
  merged pairwise in process order (Chan et al.), as ``ReconstructionSums.add`` merges
  batches. Collective: every process calls it once, with the same dictionaries."""
  if jax.process_count() == 1:
    return
  for sums in (*ev.spliced.values(), *[ev.ablated[k] for k in sorted(ev.ablated, key=str)]):
    sums.ce_clean, sums.ce_patched, sums.kl, sums.n = allreduce_sum(
        (sums.ce_clean, sums.ce_patched, sums.kl, sums.n))
  for recon in ev.recon.values():
    _reduce_recon(recon)


def _reduce_recon(r) -> None:
  # A process that saw no tokens has no mean yet; it sends zeros of the shared width d.
  d = int(allgather(np.int64(0 if r.mean is None else r.mean.shape[0])).max())
  keys = sorted(r.sums)
  ns = allgather(np.int64(r.n))
  means = allgather(np.zeros(d) if r.mean is None else r.mean.astype(np.float64))
  m2s = allgather(np.zeros(d) if r.m2 is None else r.m2.astype(np.float64))
  r.sums = dict(zip(keys, allreduce_sum([float(r.sums[k]) for k in keys])))
  r.overflow = allreduce_sum(int(r.overflow))
  r.fires = allreduce_sum(np.asarray(r.fires, np.int64))
  n, mean, m2 = 0, None, None
  for nb, mean_b, m2_b in zip(ns, means, m2s):
    nb = int(nb)
    if nb == 0:
      continue
    if mean is None:
      n, mean, m2 = nb, mean_b, m2_b
      continue
    delta = mean_b - mean
    total = n + nb
    mean = mean + delta * (nb / total)
    m2 = m2 + m2_b + delta * delta * (n * nb / total)
    n = total
  r.n, r.mean, r.m2 = n, mean, m2


def data_mesh(axis: str = "data") -> jax.sharding.Mesh:
  """A one-axis mesh over every device of every process (``fit``'s default with more
  than one process)."""
  return jax.make_mesh((jax.device_count(),), (axis,))


__all__ = ["initialize", "add_cli_flags", "init_from_args", "process_index",
           "process_count", "is_primary", "barrier", "process_block", "local_rows",
           "global_batch", "put", "gather_tree", "allgather", "allreduce_sum",
           "reduce_corpus_eval", "data_mesh"]
