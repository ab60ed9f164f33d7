"""Activation data for training: sources, a seekable shuffle, batching, and the shard format.

Training reads rows of activations ``x (N, d_in)`` and, for transcoders, paired targets
``y (N, d_out)``. Four kinds of data are accepted (:func:`as_source`):

  * an array (numpy, ``np.memmap``, jax) of shape (N, d) - random access;
  * a folder of shards written by :class:`ShardWriter` (the harvester's output) - random
    access through memory maps, never loaded whole;
  * an iterator of batches ``x`` or ``(x, y)``, any number of rows each - a stream;
  * a zero-argument callable returning such an iterator - a stream that can be replayed,
    which is what lets a stream resume exactly and run more than one epoch.

Order. For random-access data the row read at training step ``t`` is a pure function of
``(seed, t)``: row position ``p = t * batch_size + i`` is epoch ``p // N`` and slot
``p % N`` of that epoch's permutation. The permutation is a keyed Feistel network (cycle
walking keeps it inside ``[0, N)``), computed per index, so a billion-row dataset needs no
billion-entry permutation array and resuming at step ``t`` needs no replay. Streams go
through a seeded shuffle buffer instead; resuming replays the stream to the same place.

Shard format (version 1), one folder per site::

    <out>/<site>_<layer>/            e.g. acts/resid_post_22/, acts/mlp_in_5/
      meta.json
      shard_00000.npy                (rows, d) float32, or uint16 = bfloat16 bit patterns
      shard_00001.npy
      ...

``meta.json``::

    {"format": "dictlearn.activations", "version": 1,
     "site": "resid_post", "layer": 22, "d": 1152,
     "dtype": "float32" | "bfloat16",        # bfloat16 shards are stored as uint16 bits
     "rows": 131072,                          # total over the shards listed
     "shards": [{"file": "shard_00000.npy", "rows": 65536}, ...],
     "model_name": "gemma-v3-1b-pt", "hook_point": "model.layers.22.output",
     "excludes_bos": true, "extra": {...}}

Only shards listed in ``meta.json`` exist for a reader: the writer rewrites it (atomically)
after each finished shard, so a crashed harvest leaves a readable prefix. A harvest over
several processes writes one part per process (``part00001_shard_00000.npy``, ...,
``meta.part00001.json``); once all are done one process lists them, in process order, in
``meta.json`` (:func:`merge_parts`): the same rows, in the same order, as one process
would have written. A transcoder pairs two folders written in lock step (e.g.
``mlp_in_5`` and ``mlp_out_5``): same row count, row ``i`` of one is the input whose
output is row ``i`` of the other.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

FORMAT = "dictlearn.activations"
VERSION = 1

# ------------------------------------------------------------------ bfloat16 as uint16


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
  """uint16 bfloat16 bit patterns (...) -> float32 (...), exactly."""
  return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
  """float32 (...) -> uint16 bfloat16 bit patterns (...), rounded to nearest even."""
  u = np.ascontiguousarray(x, np.float32).view(np.uint32)
  # Round to nearest even on the 16 dropped bits; NaNs keep a quiet-NaN payload.
  rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
  return np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype(np.uint16)


# ------------------------------------------------------------- seekable permutation


def _mix64(v: np.ndarray) -> np.ndarray:
  """A 64-bit finaliser (splitmix64's): a cheap, well-mixing hash of uint64 arrays."""
  v = v ^ (v >> np.uint64(30))
  v = v * np.uint64(0xBF58476D1CE4E5B9)
  v = v ^ (v >> np.uint64(27))
  v = v * np.uint64(0x94D049BB133111EB)
  return v ^ (v >> np.uint64(31))


def _round_keys(seed: int, epoch: int) -> np.ndarray:
  return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(
      4, np.uint64)


def permute_indices(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
  """The images of ``positions`` (in [0, n)) under a permutation of [0, n) keyed by
  (seed, epoch): int64 array of the same shape.

  A 4-round Feistel network over the smallest even-bit domain >= n, with cycle walking
  (re-apply until the value lands in [0, n)), which is a bijection on [0, n). The domain
  is < 4n, so the walk is short on average.
  """
  positions = np.asarray(positions, np.int64)
  if n <= 0:
    raise ValueError(f"cannot permute an empty range (n={n})")
  if positions.size and (positions.min() < 0 or positions.max() >= n):
    raise ValueError(f"positions must lie in [0, {n})")
  if n == 1:
    return np.zeros_like(positions)
  half = max(1, math.ceil(math.log2(n) / 2))
  mask = np.uint64((1 << half) - 1)
  keys = _round_keys(seed, epoch)

  def once(v):
    left, right = v >> np.uint64(half), v & mask
    for k in keys:
      left, right = right, left ^ (_mix64(right ^ k) & mask)
    return (left << np.uint64(half)) | right

  out = once(positions.astype(np.uint64).ravel())
  bad = out >= np.uint64(n)
  while bad.any():
    out[bad] = once(out[bad])
    bad = out >= np.uint64(n)
  return out.astype(np.int64).reshape(positions.shape)


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
  """Row indices (batch_size,) int64 that training step ``step`` (0-based) reads.

  A pure function of its arguments: epochs are consecutive permutations of all n rows, so
  every row is read once per epoch, and the batch of any step can be computed directly.
  """
  pos = np.int64(step) * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, slots = pos // n, pos % n
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = permute_indices(slots[sel], n, seed, int(e))
  return out


# ------------------------------------------------------------------------ sources


class ArraySource:
  """Random-access rows: x (N, d_in) and optional y (N, d_out), any array-like with
  ``__getitem__`` on an index array (numpy, np.memmap, jax, :class:`ShardFolder`).

  ``gather(idx)`` returns float32 numpy copies; reads are sorted first so a memory map is
  walked forwards.
  """

  random_access = True

  def __init__(self, x, y=None):
    for name, a in (("data", x), ("targets", y)):
      if a is not None and len(a.shape) != 2:
        raise ValueError(f"{name} must be 2-D (N, d) but has shape {tuple(a.shape)}")
    if y is not None and y.shape[0] != x.shape[0]:
      raise ValueError(
          f"data has {x.shape[0]} rows but targets has {y.shape[0]}: they must pair up")
    if x.shape[0] == 0:
      raise ValueError("data has no rows")
    self.x, self.y = x, y
    self.n_rows = int(x.shape[0])
    self.d_in = int(x.shape[1])
    self.d_out = int(y.shape[1]) if y is not None else None

  @staticmethod
  def _take(a, idx):
    if isinstance(a, ShardFolder):
      return a.gather(idx)
    order = np.argsort(idx, kind="stable")
    rows = np.asarray(a[idx[order]])
    if rows.dtype == np.uint16:  # bf16 bits in a raw memmap
      rows = bf16_bits_to_f32(rows)
    out = np.empty(rows.shape, np.float32)
    out[order] = rows
    return out

  def gather(self, idx: np.ndarray):
    """(x (B, d_in), y (B, d_out) | None), float32."""
    x = self._take(self.x, idx)
    return x, (self._take(self.y, idx) if self.y is not None else None)

  def sample(self, n: int, seed: int):
    """A seeded sample of up to n distinct rows (for normalisation and initialisation)."""
    k = min(n, self.n_rows)
    # Epoch -1 (as an unsigned tag) keeps this sample's order apart from the training order.
    idx = permute_indices(np.arange(k), self.n_rows, seed, 2**32 - 1)
    return self.gather(idx)


class StreamSource:
  """Rows from an iterator of batches ``x`` or ``(x, y)`` (each (rows, d), rows may vary).

  ``data`` is an iterable or a zero-argument callable returning a fresh iterator. Only
  the callable form can replay (exact resume) and run several epochs.
  """

  random_access = False

  def __init__(self, data, targets=None):
    if targets is not None:
      raise ValueError("with an iterator of batches, yield (x, y) pairs instead of passing targets")
    self._factory = data if callable(data) and not isinstance(data, Iterator) else None
    self._first = None if self._factory else iter(data)
    self._head: list = []  # batches peeked for the sample, re-yielded by rows()
    it = self._open()
    first = next(it, None)
    if first is None:
      raise ValueError("the batch iterator is empty")
    x, y = self._split(first)
    self._head.append((x, y))
    self._it = it
    self.d_in = x.shape[1]
    self.d_out = y.shape[1] if y is not None else None
    self.n_rows = None

  @property
  def replayable(self) -> bool:
    """True when built from a callable: the stream can restart (resume, more epochs)."""
    return self._factory is not None

  def _open(self):
    if self._factory is not None:
      return iter(self._factory())
    if self._first is None:
      raise RuntimeError("this iterator was already consumed; pass a callable to replay it")
    it, self._first = self._first, None
    return it

  def _split(self, b):
    x, y = (b if isinstance(b, tuple | list) else (b, None))
    x = _as_f32_rows(x, "x")
    y = _as_f32_rows(y, "y") if y is not None else None
    if y is not None and y.shape[0] != x.shape[0]:
      raise ValueError(f"a batch pairs {x.shape[0]} inputs with {y.shape[0]} targets")
    first = getattr(self, "d_in", None)
    if first is not None and (x.shape[1] != first or (y is None) != (self.d_out is None)
                              or (y is not None and y.shape[1] != self.d_out)):
      raise ValueError(
          f"a batch has x {x.shape}{'' if y is None else f' and y {y.shape}'} but the "
          f"stream began with d_in={first}{'' if self.d_out is None else f', d_out={self.d_out}'}")
    return x, y

  def sample(self, n: int, seed: int):
    """The first n rows of the stream (kept and re-yielded by :meth:`batches`)."""
    del seed  # A stream's order is its own; the shuffle happens later.
    have = sum(b[0].shape[0] for b in self._head)
    while have < n:
      b = next(self._it, None)
      if b is None:
        break
      self._head.append(self._split(b))
      have += self._head[-1][0].shape[0]
    xs = np.concatenate([b[0] for b in self._head])[:n]
    ys = (np.concatenate([b[1] for b in self._head])[:n]
          if self._head[0][1] is not None else None)
    return xs, ys

  def _epoch_batches(self, epoch: int):
    if epoch == 0:
      head, self._head = self._head, []
      yield from head
      it, self._it = self._it, None
      if it is None:  # Epoch 0 replayed (resume): open afresh.
        it = self._open()
        yield from (self._split(b) for b in it)
        return
      for b in it:
        yield self._split(b)
    else:
      if self._factory is None:
        return
      for b in self._factory():
        yield self._split(b)

  def batches(self, batch_size: int, seed: int, start_step: int = 0,
              buffer_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(x, y) batches of exactly batch_size rows, shuffled through a seeded buffer.

    The first ``start_step`` batches are produced and dropped, so a replayable stream
    resumes exactly where an uninterrupted run would be.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7])
    buf = _ShuffleBuffer(max(buffer_rows, batch_size), rng)
    step = 0
    epoch = 0
    while True:
      got_any = False
      for x, y in self._epoch_batches(epoch):
        got_any = True
        buf.add(x, y)
        while buf.ready(batch_size):
          out = buf.take(batch_size)
          if step >= start_step:
            yield out
          step += 1
      if self._factory is None or not got_any:
        break
      epoch += 1
    # Stream ended: what the buffer holds still comes out, in full batches only.
    while buf.size >= batch_size:
      out = buf.take(batch_size)
      if step >= start_step:
        yield out
      step += 1


class _ShuffleBuffer:
  """Holds up to ``capacity`` rows; a batch is drawn at random positions once full."""

  def __init__(self, capacity: int, rng: np.random.Generator):
    self.capacity, self.rng = capacity, rng
    self.xs: np.ndarray | None = None
    self.ys: np.ndarray | None = None
    self.size = 0

  def add(self, x, y):
    if self.xs is None:
      self.xs = np.empty((self.capacity + x.shape[0], x.shape[1]), np.float32)
      self.ys = None if y is None else np.empty((self.capacity + x.shape[0], y.shape[1]),
                                                np.float32)
    need = self.size + x.shape[0]
    if need > self.xs.shape[0]:  # a batch larger than the slack: grow
      self.xs = np.concatenate([self.xs[:self.size], np.empty_like(x)])
      if self.ys is not None:
        self.ys = np.concatenate([self.ys[:self.size], np.empty_like(y)])
    self.xs[self.size:need] = x
    if self.ys is not None:
      self.ys[self.size:need] = y
    self.size = need

  def ready(self, batch_size):
    return self.size >= max(self.capacity, batch_size)

  def take(self, batch_size):
    pick = self.rng.choice(self.size, batch_size, replace=False)
    x = self.xs[pick]
    y = self.ys[pick] if self.ys is not None else None
    # Move the unpicked rows of the tail into the picked holes below it: O(batch) work,
    # and the live rows stay contiguous in [0, size - batch_size).
    end = self.size - batch_size
    holes = pick[pick < end]
    tail = np.arange(end, self.size)
    movers = tail[~np.isin(tail, pick)]
    self.xs[holes] = self.xs[movers]
    if self.ys is not None:
      self.ys[holes] = self.ys[movers]
    self.size = end
    return x, y


def _as_f32_rows(a, name) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype == np.uint16:
    a = bf16_bits_to_f32(a)
  if a.ndim < 2:
    raise ValueError(f"{name} batches must be (rows, d) (or (..., d)) but one has shape {a.shape}")
  return np.asarray(a.reshape(-1, a.shape[-1]), np.float32)


def random_access_batches(src: ArraySource, batch_size: int, seed: int,
                          start_step: int = 0, rows: np.ndarray | None = None
                          ) -> Iterator[tuple[np.ndarray, Any]]:
  """(x, y) for steps start_step, start_step + 1, ... (endless): see :func:`batch_indices`.

  ``rows`` (k,): only those positions of each batch are read (a process's share of a
  global batch), giving (k, d) arrays.
  """
  step = start_step
  while True:
    idx = batch_indices(seed, step, batch_size, src.n_rows)
    yield src.gather(idx if rows is None else idx[rows])
    step += 1


def as_source(data, targets=None) -> ArraySource | StreamSource:
  """Wraps whatever ``fit`` was given: array, memmap, shard folder (path), or batches."""
  if isinstance(data, ArraySource | StreamSource):
    return data
  if isinstance(data, str | os.PathLike):
    data = ShardFolder(data)
  if isinstance(targets, str | os.PathLike):
    targets = ShardFolder(targets)
  if isinstance(data, ShardFolder) or hasattr(data, "shape"):
    if targets is not None and not (isinstance(targets, ShardFolder) or hasattr(targets, "shape")):
      raise ValueError("targets must be an array (or shard folder) when data is one")
    return ArraySource(data, targets)
  if isinstance(data, Iterable) or callable(data):
    return StreamSource(data, targets)
  raise TypeError(
      f"data must be an array (N, d), a np.memmap, a shard folder path, an iterator of "
      f"batches or a callable returning one; got {type(data).__name__}")


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
  """Runs ``it`` in a background thread, ``depth`` items ahead (host gathers overlap the
  device step). Exceptions are re-raised in the consumer."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  done = object()

  def work():
    try:
      for item in it:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(done)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      q.put(e)

  t = threading.Thread(target=work, daemon=True)
  t.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


# -------------------------------------------------------------------------- shards


class ShardFolder:
  """Reads a shard folder (format above) as one (rows, d) float32 array, lazily.

  Supports ``shape``, ``len``, ``folder[i0:i1]`` and ``gather(idx)``; each shard is a
  read-only memory map, so the data never has to fit in memory.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    meta_path = os.path.join(self.path, "meta.json")
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(
          f"{self.path} is not an activation shard folder: no meta.json (see "
          "dictlearn.activation_data for the format)")
    with open(meta_path) as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
      raise ValueError(
          f"{meta_path}: expected format {FORMAT!r} version {VERSION}, got "
          f"{self.meta.get('format')!r} version {self.meta.get('version')!r}")
    self.d = int(self.meta["d"])
    self.dtype = self.meta["dtype"]
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"{meta_path}: dtype must be float32 or bfloat16, not {self.dtype!r}")
    self._maps = []
    rows = []
    for s in self.meta["shards"]:
      m = np.load(os.path.join(self.path, s["file"]), mmap_mode="r")
      want = np.uint16 if self.dtype == "bfloat16" else np.float32
      if m.dtype != want or m.ndim != 2 or m.shape != (s["rows"], self.d):
        raise ValueError(
            f"{self.path}/{s['file']}: expected ({s['rows']}, {self.d}) {np.dtype(want)} "
            f"but found {m.shape} {m.dtype}")
      self._maps.append(m)
      rows.append(m.shape[0])
    self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    if not rows:
      raise ValueError(f"{self.path}: meta.json lists no shards")

  @property
  def shape(self):
    return (int(self._starts[-1]), self.d)

  def __len__(self):
    return self.shape[0]

  @property
  def site(self):
    return self.meta.get("site")

  @property
  def layer(self):
    return self.meta.get("layer")

  def _convert(self, rows):
    return bf16_bits_to_f32(rows) if self.dtype == "bfloat16" else np.asarray(rows, np.float32)

  def gather(self, idx) -> np.ndarray:
    """Rows ``idx`` (B,) -> (B, d) float32, in the order asked."""
    idx = np.asarray(idx, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      raise IndexError(f"row index out of range for {len(self)} rows")
    out = np.empty((idx.size, self.d), np.float32)
    which = np.searchsorted(self._starts, idx, side="right") - 1
    for s in np.unique(which):
      sel = np.flatnonzero(which == s)
      local = idx[sel] - self._starts[s]
      order = np.argsort(local, kind="stable")
      out[sel[order]] = self._convert(self._maps[s][local[order]])
    return out

  def __getitem__(self, key):
    if isinstance(key, slice):
      return self.gather(np.arange(len(self))[key])
    return self.gather(np.asarray(key))


class ShardWriter:
  """Writes activations for one site as a shard folder (format above).

  ``append(x)`` takes (rows, d) (or (..., d)) float arrays in any chunk size; rows are cut
  into shards of ``shard_rows``. ``close()`` (or leaving a ``with`` block) writes the last,
  possibly shorter, shard. Use it as a context manager.
  """

  def __init__(self, folder, *, d: int, site: str | None = None, layer: int | None = None,
               dtype: str = "float32", shard_rows: int = 65536,
               model_name: str | None = None, hook_point: str | None = None,
               excludes_bos: bool | None = None, extra: dict | None = None,
               part: int | None = None):
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    self.folder = os.fspath(folder)
    # A part (one process's share of a many-process harvest) writes its own shard names
    # and meta file; merge_parts lists every part's shards in meta.json afterwards.
    self.part = None if part is None else int(part)
    self._prefix = "" if part is None else f"part{self.part:05d}_"
    self._meta_name = "meta.json" if part is None else _part_meta_name(self.part)
    for name in {"meta.json", self._meta_name}:
      if os.path.exists(os.path.join(self.folder, name)):
        raise FileExistsError(f"{self.folder} already holds a shard folder; pick a new one")
    os.makedirs(self.folder, exist_ok=True)
    self.d, self.dtype, self.shard_rows = int(d), dtype, int(shard_rows)
    self.meta = {"format": FORMAT, "version": VERSION, "site": site, "layer": layer,
                 "d": self.d, "dtype": dtype, "rows": 0, "shards": [],
                 "model_name": model_name, "hook_point": hook_point,
                 "excludes_bos": excludes_bos, "extra": extra or {}}
    self._pending: list[np.ndarray] = []
    self._pending_rows = 0
    self._write_meta()

  @staticmethod
  def folder_name(site: str, layer: int) -> str:
    """The conventional sub-folder for a site: ``f"{site}_{layer}"``."""
    return f"{site}_{layer}"

  def append(self, x) -> None:
    x = np.asarray(x, np.float32)
    if x.shape[-1] != self.d:
      raise ValueError(f"this shard folder holds d={self.d} but got rows of {x.shape[-1]}")
    x = x.reshape(-1, self.d)
    self._pending.append(x)
    self._pending_rows += x.shape[0]
    while self._pending_rows >= self.shard_rows:
      allx = np.concatenate(self._pending)
      self._flush(allx[:self.shard_rows])
      rest = allx[self.shard_rows:]
      self._pending, self._pending_rows = [rest], rest.shape[0]

  def _flush(self, rows: np.ndarray):
    name = f"{self._prefix}shard_{len(self.meta['shards']):05d}.npy"
    data = f32_to_bf16_bits(rows) if self.dtype == "bfloat16" else rows
    tmp = os.path.join(self.folder, name + ".tmp")
    with open(tmp, "wb") as f:
      np.save(f, np.ascontiguousarray(data))
    os.replace(tmp, os.path.join(self.folder, name))
    self.meta["shards"].append({"file": name, "rows": int(rows.shape[0])})
    self.meta["rows"] += int(rows.shape[0])
    self._write_meta()

  def _write_meta(self):
    _write_json(self.folder, self._meta_name, self.meta)

  def close(self) -> None:
    if self._pending_rows:
      self._flush(np.concatenate(self._pending))
      self._pending, self._pending_rows = [], 0

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _part_meta_name(part: int) -> str:
  return f"meta.part{int(part):05d}.json"


def _write_json(folder, name, doc):
  tmp = os.path.join(folder, name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
  os.replace(tmp, os.path.join(folder, name))


def merge_parts(folder, parts) -> dict:
  """Writes ``folder/meta.json`` listing the shards of ``parts`` (part indices, in row
  order) written by ``ShardWriter(..., part=i)``, and removes the parts' meta files.

  The folder then reads as one shard folder whose rows are part ``parts[0]``'s, then
  ``parts[1]``'s, and so on. Returns the merged meta.
  """
  folder = os.fspath(folder)
  metas = []
  for i in parts:
    path = os.path.join(folder, _part_meta_name(i))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: part {i} of the harvest did not finish "
                              "(every process must write to the same folder)")
    with open(path) as f:
      metas.append(json.load(f))
  if not metas:
    raise ValueError(f"{folder}: no parts to merge")
  merged = dict(metas[0], shards=[], rows=0)
  for i, m in zip(parts, metas):
    for key in ("d", "dtype", "site", "layer"):
      if m[key] != merged[key]:
        raise ValueError(f"{folder}: part {i} has {key}={m[key]!r} but part {parts[0]} "
                         f"has {merged[key]!r}")
    merged["shards"] += m["shards"]
    merged["rows"] += m["rows"]
  _write_json(folder, "meta.json", merged)
  for i in parts:
    os.remove(os.path.join(folder, _part_meta_name(i)))
  return merged


def open_shards(root, site: str, layer: int) -> ShardFolder:
  """The shard folder ``<root>/<site>_<layer>``."""
  return ShardFolder(os.path.join(os.fspath(root), ShardWriter.folder_name(site, layer)))


__all__ = [
    "ArraySource", "StreamSource", "ShardFolder", "ShardWriter", "as_source", "batch_indices",
    "merge_parts",
    "permute_indices", "prefetch", "random_access_batches", "open_shards",
    "bf16_bits_to_f32", "f32_to_bf16_bits",
]
