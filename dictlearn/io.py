"""Reading and writing dictionaries: Gemma Scope 2 and 1 layouts, local or on the hub.

Gemma Scope 2 (``<site>/<name>/`` on the hub, or any local folder)::

    params.safetensors   w_enc (d_in, width), b_enc (width,), threshold (width,),
                         w_dec (width, d_out), b_dec (d_out,),
                         affine_skip_connection (d_in, d_out)   affine transcoders only
    config.json          model_name, architecture ("jump_relu"), type ("sae" | "transcoder"),
                         hf_hook_point_in, hf_hook_point_out, width, l0, affine_connection

Gemma Scope 1 (``layer_20/width_16k/average_l0_71/params.npz``): the same tensors with
upper-case ``W_enc``/``W_dec``, no config; the site and layer come from the repository
name and the path. It is read with ``allow_pickle=False``, always.

Hub references are ``owner/repo/<folder path>``, fetched with huggingface_hub, so its cache,
``HF_HUB_OFFLINE``, tokens and revision pinning all apply.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dictlearn import sites
from dictlearn.crosslayer import CrossLayerTranscoder
from dictlearn.dictionary import DictMeta, Dictionary, JumpReLUSAE, Transcoder

PARAMS_FILE = "params.safetensors"
CLT_LAYER_FILE = "params_layer_{}.safetensors"  # Cross-layer transcoders: one per layer.
CONFIG_FILE = "config.json"
GS1_PARAMS_FILE = "params.npz"

_CORE = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")
_SKIP = "affine_skip_connection"
# Keys config.json carries that become DictMeta fields; everything else goes to meta.extra.
_KNOWN_CONFIG = {"model_name", "architecture", "type", "hf_hook_point_in", "hf_hook_point_out",
                 "width", "l0", "affine_connection"}


class DictionaryFileError(ValueError):
  """A dictionary file or folder is missing, corrupt, or not in a layout we read."""


# ----------------------------------------------------------------------------- save


def save(d: Dictionary, folder: str | os.PathLike) -> Path:
  """Writes ``d`` in the Gemma Scope 2 layout; ``load`` of the folder gives it back exactly.

  Weights keep their dtype (bfloat16 included). Returns the folder path.
  """
  d.validate()
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if isinstance(d, CrossLayerTranscoder):
    return _save_clt(d, folder)
  tensors = {name: np.asarray(getattr(d, name)) for name in _CORE}
  if d.w_skip is not None:
    tensors[_SKIP] = np.asarray(d.w_skip)
  _write_safetensors(tensors, folder / PARAMS_FILE)
  (folder / CONFIG_FILE).write_text(json.dumps(_config_of(d), indent=2) + "\n")
  return folder


def _write_safetensors(tensors: dict, path: Path):
  from safetensors.numpy import save_file

  # Write to a temporary name first so an interrupted save never leaves a truncated file
  # where a good one was.
  tmp = path.with_name(path.name + ".tmp")
  save_file(tensors, str(tmp))
  os.replace(tmp, path)


def _save_clt(c: CrossLayerTranscoder, folder: Path) -> Path:
  """One Gemma Scope 2 ``params_layer_{i}.safetensors`` per encoder layer + config.json."""
  stale = folder / CLT_LAYER_FILE.format(c.n_layers)
  if stale.exists():  # A longer CLT saved here before would be read back with extra layers.
    raise DictionaryFileError(f"{folder} already holds {stale.name}: save a CLT with "
                              f"{c.n_layers} layers to an empty folder")
  for i in range(c.n_layers):
    tensors = {name: np.asarray(getattr(c, name)[i]) for name in _CORE
               if getattr(c, name) is not None}
    if c.w_skip is not None:
      tensors[_SKIP] = np.asarray(c.w_skip[i])
    _write_safetensors(tensors, folder / CLT_LAYER_FILE.format(i))
  m = c.meta
  config = {"model_name": m.model_name, "architecture": "jump_relu", "type": "clt",
            "n_layers": c.n_layers, "width": c.width, "l0": m.l0,
            "affine_connection": c.w_skip is not None}
  config.update({k: json.loads(v) for k, v in m.extra})
  (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  return folder


def _config_of(d: Dictionary) -> dict:
  m = d.meta
  try:
    read, write = sites.read_write(d)
  except ValueError:  # The metadata names no site: nothing to derive.
    read = write = None
  hp_in = m.hook_point_in or (read.hook_point if read else None)
  hp_out = m.hook_point_out or (write.hook_point if write else None)
  config = {
      "model_name": m.model_name,
      "architecture": "jump_relu",
      "type": d.kind,
      "hf_hook_point_in": hp_in,
      "hf_hook_point_out": hp_out,
      "width": d.width,
      "l0": m.l0,
      "affine_connection": d.w_skip is not None,
  }
  config.update({k: json.loads(v) for k, v in m.extra})
  return config


# ----------------------------------------------------------------------------- load


@dataclasses.dataclass
class ReadStats:
  """What one ``load`` read from disk; pass one as ``load(..., read_stats=stats)``.

  Keys are the devices the arrays were placed on, or ``None`` for reads that placed
  nothing on a device of their own (``sharding=None``, and the finiteness scan of
  ``mmap=True``). Bytes are counted in the file's dtype, as requested from the file.
  """

  bytes_read: dict = dataclasses.field(default_factory=dict)
  shard_bytes: dict = dataclasses.field(default_factory=dict)

  @property
  def total_read(self) -> int:
    return sum(self.bytes_read.values())

  def _add(self, key, read: int, held: int):
    self.bytes_read[key] = self.bytes_read.get(key, 0) + read
    self.shard_bytes[key] = self.shard_bytes.get(key, 0) + held


@dataclasses.dataclass(frozen=True)
class _Options:
  dtype: np.dtype | None
  sharding: object
  width_axis: str | None
  mmap: bool
  check_finite: bool
  stats: ReadStats | None


def load(ref: str | os.PathLike, *, revision: str | None = None,
         cache_dir: str | os.PathLike | None = None, dtype=None, sharding=None,
         width_axis: str | None = None, mmap: bool = False, check_finite: bool = True,
         read_stats: ReadStats | None = None) -> Dictionary:
  """Loads a dictionary from a folder, a params file, or a hub reference.

  Nothing is allocated before the file's header (safetensors JSON header, or the zip
  directory and .npy headers) and its size agree with each other and with what a
  dictionary needs: missing or extra tensors, shapes, dtypes, a truncated file, or a
  header whose offsets lie are a ``DictionaryFileError`` at once, however large the
  tensors claim to be. Then tensors are read one at a time, in chunks of rows.

  Args:
    ref: a local folder holding ``params.safetensors`` (+ ``config.json``),
      ``params.npz``, or a cross-layer transcoder's ``params_layer_{i}.safetensors``
      files; one of the first two files; or ``owner/repo/<path>`` on the hub, e.g.
      ``google/gemma-scope-2-1b-pt/resid_post/layer_22_width_65k_l0_medium`` or
      ``google/gemma-scope-2-270m-pt/clt/<name>``. A CLT takes ``dtype`` and
      ``check_finite``; it is not sharded or memory-mapped.
    revision: hub revision (branch, tag or commit) to pin.
    cache_dir: huggingface_hub cache folder (its default otherwise).
    dtype: the weights' dtype (e.g. ``jnp.bfloat16``); default keeps the stored dtype.
      Each chunk is converted as it is read, so host memory peaks near the converted
      size, not the file's size plus the converted size. Rounding is numpy's (ml_dtypes),
      bit-identical to ``load(ref).astype(dtype)``.
    sharding: where the arrays go (default: the default device, uncommitted). One of
      a ``jax.sharding.Mesh``: split the width over ``mesh[width_axis]``;
      a ``NamedSharding(mesh, P(None, axis))``: that is w_enc's sharding, and the width
      axis ``axis`` (a name or tuple of names) gives the others;
      a ``NamedSharding(mesh, P())`` or any fully replicated sharding (e.g.
      ``SingleDeviceSharding``): every tensor replicated there.
      Width-split tensors follow ``dictlearn.sharding.dictionary_specs``: w_enc
      ``P(None, axis)``, b_enc and threshold ``P(axis)``, w_dec ``P(axis, None)``; b_dec
      and w_skip ``P()``. Each process reads from disk only the slices its addressable
      devices hold (once per distinct slice) and places them directly.
    width_axis: the mesh axis that splits the width when ``sharding`` is a Mesh
      (default ``"width"``).
    mmap: map the file and read nothing into memory: the weights are read-only
      ``numpy.memmap`` arrays in the file's dtype (not placed on a device; jax copies
      what a computation uses). Not combinable with ``sharding`` or a ``dtype`` other
      than the stored one. Gemma Scope 1 ``.npz`` members must be stored uncompressed
      (``np.savez``); a compressed one is an error naming it. With ``check_finite`` the
      file is scanned once in chunks (no copy kept); pass ``check_finite=False`` to read
      nothing at all at load time.
    check_finite: refuse weights with NaN or inf (checked after conversion, chunk by
      chunk; under a sharding, each process checks the slices it reads).
    read_stats: a ``ReadStats`` to fill with the bytes read per device.

  Returns:
    A ``JumpReLUSAE``, ``Transcoder`` or ``CrossLayerTranscoder`` whose ``meta`` names its site, layer and source.
    Its weights are ``jax.Array`` (committed to ``sharding`` when one is given), or
    ``numpy.memmap`` with ``mmap=True``.

  Raises:
    DictionaryFileError: a file that is missing tensors, has extra ones, wrong shapes or
      dtypes, a config that disagrees with it, a truncated file or a header that lies
      (before any tensor is read), or non-finite weights (while reading).
    ValueError: a sharding that does not fit (see above; the width must divide evenly
      over the width axis), or options that cannot be combined.
    FileNotFoundError, PermissionError: a hub reference that cannot be fetched.
  """
  if dtype is not None:
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"dtype must be a floating dtype (e.g. jnp.bfloat16), not {dtype}")
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
  if mmap and sharding is not None:
    raise ValueError(
        "mmap=True keeps the weights on the host as numpy memory maps, so it cannot also "
        "place them with sharding=; drop one of the two (a sharded load already reads "
        "only each device's slices)")
  if width_axis is not None and not isinstance(sharding, Mesh):
    raise ValueError("width_axis= names the width axis of a Mesh passed as sharding=; "
                     "with a NamedSharding the axis is read from its spec")
  opts = _Options(dtype=dtype, sharding=sharding, width_axis=width_axis or "width",
                  mmap=mmap, check_finite=check_finite, stats=read_stats)
  path = Path(ref)
  if path.exists():
    d = _load_local(path, opts)
  elif _looks_like_hub_ref(str(ref)):
    d = _load_hub(str(ref), revision=revision, cache_dir=cache_dir, opts=opts)
  else:
    raise FileNotFoundError(
        f"{ref!s} is neither a local file or folder nor a hub reference of the form "
        "owner/repo/<folder>, e.g. google/gemma-scope-2-270m-pt/resid_post/"
        "layer_9_width_16k_l0_small")
  return d.validate()  # Finiteness was checked while reading.


def _looks_like_hub_ref(ref: str) -> bool:
  return len(ref.strip("/").split("/")) >= 2 and not ref.startswith((".", "/", "~"))


def _load_local(path: Path, opts: _Options) -> Dictionary:
  if path.is_dir():
    if (path / CLT_LAYER_FILE.format(0)).exists():
      return _read_clt(path, opts)
    if (path / PARAMS_FILE).exists():
      return _read_gs2(path / PARAMS_FILE, path / CONFIG_FILE, source=str(path), opts=opts)
    if (path / GS1_PARAMS_FILE).exists():
      return _read_gs1(path / GS1_PARAMS_FILE, source=str(path), opts=opts)
    raise DictionaryFileError(
        f"{path} holds neither {PARAMS_FILE} (Gemma Scope 2) nor {GS1_PARAMS_FILE} "
        f"(Gemma Scope 1); found: {sorted(p.name for p in path.iterdir())[:10]}")
  if path.suffix == ".safetensors":
    return _read_gs2(path, path.with_name(CONFIG_FILE), source=str(path), opts=opts)
  if path.suffix == ".npz":
    return _read_gs1(path, source=str(path), opts=opts)
  raise DictionaryFileError(f"{path}: expected a .safetensors or .npz params file")


def _read_gs2(params: Path, config: Path, *, source: str, opts: _Options) -> Dictionary:
  layout = _safetensors_layout(params)
  cfg = {}
  if config.exists():
    try:
      cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
      raise DictionaryFileError(f"{config} is not valid JSON: {e}") from e
  return _materialize(layout, cfg, source=source, where=str(params), opts=opts)


def _read_gs1(params: Path, *, source: str, opts: _Options) -> Dictionary:
  layout = _npz_layout(params)
  layout = {k.lower() if k in ("W_enc", "W_dec") else k: v for k, v in layout.items()}
  return _materialize(layout, _gs1_config(source), source=source, where=str(params),
                      opts=opts)


_CLT_REQUIRED = ("w_enc", "b_enc", "threshold", "w_dec")
_CLT_OPTIONAL = ("b_dec", _SKIP)


def _read_clt(folder: Path, opts: _Options) -> CrossLayerTranscoder:
  """A Gemma Scope 2 ``clt/<name>/`` folder: ``params_layer_{i}.safetensors`` for every i.

  Every layer file's header is checked (names, shapes, dtypes, and that the files count
  the layers w_dec decodes into) before anything is read; the tensors are then read layer
  by layer into preallocated stacked arrays.
  """
  if opts.sharding is not None or opts.mmap:
    raise ValueError("cross-layer transcoders load onto the default device: drop sharding= "
                     "and mmap= (they apply to SAEs and per-layer transcoders)")
  files = []
  while (folder / CLT_LAYER_FILE.format(len(files))).exists():
    files.append(folder / CLT_LAYER_FILE.format(len(files)))
  n = len(files)
  found = sorted(p.name for p in folder.glob("params_layer_*.safetensors"))
  if len(found) != n:
    raise DictionaryFileError(
        f"{folder}: layer files must be params_layer_0 ... params_layer_{{n-1}} with none "
        f"missing; found {found}")
  cfg = {}
  if (folder / CONFIG_FILE).exists():
    try:
      cfg = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
      raise DictionaryFileError(f"{folder / CONFIG_FILE} is not valid JSON: {e}") from e
  layouts = [_safetensors_layout(p) for p in files]
  first = layouts[0]
  for i, (p, layout) in enumerate(zip(files, layouts)):
    missing = [k for k in _CLT_REQUIRED if k not in layout]
    extra = sorted(set(layout) - set(_CLT_REQUIRED) - set(_CLT_OPTIONAL))
    if missing or extra:
      raise DictionaryFileError(
          f"{p}: {'lacks ' + ', '.join(missing) if missing else ''}"
          f"{'; ' if missing and extra else ''}"
          f"{'has unexpected tensors ' + str(extra) if extra else ''}. A CLT layer file holds "
          f"{', '.join(_CLT_REQUIRED)} (+ optional {', '.join(_CLT_OPTIONAL)})")
    if set(layout) != set(first):
      raise DictionaryFileError(
          f"{p} holds {sorted(layout)} but {files[0].name} holds {sorted(first)}: every "
          "layer of a CLT has the same tensors")
    for name, t in layout.items():
      if t.shape != first[name].shape:
        raise DictionaryFileError(
            f"{p}: {name} has shape {t.shape} but layer 0's is {first[name].shape}")
  w_dec = first["w_dec"]
  if len(w_dec.shape) != 3 or w_dec.shape[1] != n:
    raise DictionaryFileError(
        f"{files[0]}: w_dec must be (width, n_layers, d_out) with n_layers = the {n} layer "
        f"files in {folder}, but has shape {w_dec.shape}")
  for key in ("n_layers", "width"):
    got = {"n_layers": n, "width": first["w_enc"].shape[-1]}[key]
    if key in cfg and cfg[key] != got:
      raise DictionaryFileError(f"{folder}: config.json says {key}={cfg[key]} but the files "
                                f"give {got}")
  if "affine_connection" in cfg and bool(cfg["affine_connection"]) != (_SKIP in first):
    raise DictionaryFileError(
        f"{folder}: config.json says affine_connection={cfg['affine_connection']} but the "
        f"layer files {'have' if _SKIP in first else 'lack'} {_SKIP}")
  arrays = {}
  for name, t in first.items():
    dtype = opts.dtype if opts.dtype is not None else np.dtype(
        jax.dtypes.canonicalize_dtype(t.dtype))
    out = _empty((n, *t.shape), dtype)
    for i, (p, layout) in enumerate(zip(files, layouts)):
      reader = _Reader(p, check_finite=opts.check_finite, where=str(p))
      try:
        read = reader.read(name, layout[name], (), out[i])
      finally:
        reader.close()
      if opts.stats is not None:
        opts.stats._add(None, read, layout[name].nbytes)
    arrays["w_skip" if name == _SKIP else name] = jax.device_put(out)
  meta = DictMeta(
      kind="clt", site="mlp_in", site_out="mlp_out", model_name=cfg.get("model_name"),
      l0=cfg.get("l0"), source=str(folder),
      extra=tuple(sorted((k, json.dumps(v)) for k, v in cfg.items()
                         if k not in _KNOWN_CONFIG | {"n_layers"})))
  try:
    return CrossLayerTranscoder(**arrays, meta=meta).validate()
  except ValueError as e:
    raise DictionaryFileError(f"{folder}: {e}") from e


def _gs1_config(source: str) -> dict:
  """Gemma Scope 1 has no config.json: read the site and layer from the path."""
  cfg = {"architecture": "jump_relu", "type": "sae"}
  m = re.search(r"layer_(\d+)", source)
  kind = None
  for suffix, k in (("-res", "resid_post"), ("-mlp", "mlp_out"), ("-att", "attn_z"),
                    ("-transcoders", "transcoder")):
    if re.search(re.escape(suffix) + r"(/|$)", source):
      kind = k
  if m and kind:
    layer = int(m.group(1))
    if kind == "transcoder":
      cfg["type"] = "transcoder"
      cfg["hf_hook_point_in"] = sites.mlp_in(layer).hook_point
      cfg["hf_hook_point_out"] = sites.mlp_out(layer).hook_point
    else:
      cfg["hf_hook_point_in"] = cfg["hf_hook_point_out"] = sites.Site(kind, layer).hook_point
  l0 = re.search(r"average_l0_(\d+)", source)
  if l0:
    cfg["l0"] = int(l0.group(1))
  return cfg


def _build(tensors: dict, cfg: dict, *, source: str, where: str) -> Dictionary:
  """Every check on names, shapes, dtypes and config; leaves are ``tensors``' values as
  given (the loaders pass ``_Stored`` headers, so nothing has been read yet)."""
  missing = [k for k in _CORE if k not in tensors]
  if missing:
    raise DictionaryFileError(
        f"{where} lacks {', '.join(missing)}; a JumpReLU dictionary needs "
        f"{', '.join(_CORE)} (+ {_SKIP} for affine transcoders). Found: {sorted(tensors)}")
  unexpected = sorted(set(tensors) - set(_CORE) - {_SKIP})
  if unexpected:
    raise DictionaryFileError(
        f"{where} has unexpected tensors {unexpected}; refusing to drop them silently. "
        f"Expected {', '.join(_CORE)} (+ {_SKIP})")
  has_skip = _SKIP in tensors
  if "affine_connection" in cfg and bool(cfg["affine_connection"]) != has_skip:
    raise DictionaryFileError(
        f"{where}: config.json says affine_connection={cfg['affine_connection']} but the "
        f"file {'has' if has_skip else 'lacks'} {_SKIP}")
  if cfg.get("architecture", "jump_relu") != "jump_relu":
    raise DictionaryFileError(
        f"{where}: architecture {cfg['architecture']!r} is not supported (only jump_relu)")
  kind = cfg.get("type") or ("transcoder" if has_skip else "sae")
  if kind not in ("sae", "transcoder"):
    raise DictionaryFileError(f"{where}: config type {kind!r} is neither 'sae' nor 'transcoder'")
  if "width" in cfg and cfg["width"] != tensors["w_enc"].shape[-1]:
    raise DictionaryFileError(
        f"{where}: config.json says width={cfg['width']} but w_enc has shape "
        f"{tensors['w_enc'].shape}")

  site = layer = site_out = None
  for key in ("hf_hook_point_in", "hf_hook_point_out"):
    if cfg.get(key):
      try:
        s = sites.Site.from_hook_point(cfg[key])
      except ValueError:
        continue  # An unfamiliar hook point is kept verbatim; the site stays unknown.
      if key == "hf_hook_point_in":
        site, layer = s.kind, s.layer
      else:
        site_out = s.kind
  meta = DictMeta(
      kind=kind, site=site, layer=layer, site_out=site_out,
      model_name=cfg.get("model_name"), hook_point_in=cfg.get("hf_hook_point_in"),
      hook_point_out=cfg.get("hf_hook_point_out"), l0=cfg.get("l0"), source=source,
      extra=tuple(sorted((k, json.dumps(v)) for k, v in cfg.items() if k not in _KNOWN_CONFIG)))
  arrays = {k: tensors[k] for k in _CORE}
  try:
    if kind == "sae":
      if has_skip:
        raise DictionaryFileError(f"{where}: an SAE cannot have {_SKIP}; set type to transcoder")
      d = JumpReLUSAE(**arrays, meta=meta)
    else:
      d = Transcoder(**arrays, w_skip=tensors[_SKIP] if has_skip else None, meta=meta)
    return d.validate()
  except DictionaryFileError:
    raise
  except ValueError as e:
    raise DictionaryFileError(f"{where}: {e}") from e


# ------------------------------------------------------------ file layouts (headers)


@dataclasses.dataclass(frozen=True)
class _Stored:
  """Where one tensor lies in a file, from its header alone."""

  shape: tuple
  dtype: np.dtype
  path: Path
  offset: int | None = None  # Absolute byte offset of the data; None: compressed member.
  fortran: bool = False      # .npy files may hold Fortran-order arrays.
  member: str | None = None  # The .npz member (compressed members are read as a stream).
  compression: str | None = None

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
              "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
              "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header.


def _safetensors_layout(params: Path) -> dict[str, _Stored]:
  """Parses and checks the header against the file size; reads no tensor data."""
  bad = f"{params} is not a readable safetensors file (truncated or corrupt?)"
  size = params.stat().st_size
  with open(params, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise DictionaryFileError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER):
      raise DictionaryFileError(
          f"{bad}: its header length field says {n} bytes but the file holds {size} "
          f"bytes{' (and headers are at most 100 MB)' if n > _MAX_HEADER else ''}")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DictionaryFileError(f"{bad}: its header is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise DictionaryFileError(f"{bad}: its header is not a JSON object")
  data_start, data_len = 8 + n, size - 8 - n
  out, spans = {}, []
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
      if not all(isinstance(s, int) and s >= 0 for s in shape) or not (
          isinstance(begin, int) and isinstance(end, int)):
        raise TypeError
    except (KeyError, TypeError, ValueError) as e:
      raise DictionaryFileError(
          f"{bad}: header entry {name!r} is not {{dtype, shape, data_offsets}}: "
          f"{str(entry)[:200]}") from e
    if code not in _ST_DTYPES:
      raise DictionaryFileError(f"{bad}: tensor {name!r} has unknown dtype {code!r}")
    t = _Stored(tuple(shape), np.dtype(_ST_DTYPES[code]), params, data_start + begin)
    if end - begin != t.nbytes or begin < 0:
      raise DictionaryFileError(
          f"{bad}: the header says {name!r} is {code} {tuple(shape)} ({t.nbytes} bytes) "
          f"but gives it data_offsets [{begin}, {end}] ({end - begin} bytes)")
    if end > data_len:
      raise DictionaryFileError(
          f"{bad}: the header puts {name!r} ({code} {tuple(shape)}) at bytes [{begin}, "
          f"{end}) of the data, but the file holds only {data_len} bytes of data after the "
          f"header ({size} in all)")
    out[name] = t
    spans.append((begin, end, name))
  # Like safetensors: the tensors tile the data region exactly, no gaps, overlaps or tail.
  pos = 0
  for begin, end, name in sorted(spans):
    if begin != pos:
      raise DictionaryFileError(
          f"{bad}: {name!r} starts at data byte {begin}, but the previous tensor ends at "
          f"{pos} (the header's offsets overlap or leave a gap)")
    pos = end
  if pos != data_len:
    raise DictionaryFileError(
        f"{bad}: its tensors end at data byte {pos} but the file has {data_len} bytes of "
        "data after the header")
  return out


def _npz_layout(params: Path) -> dict[str, _Stored]:
  """The zip directory and each member's .npy header, checked; reads no tensor data."""
  bad = f"{params} is not a readable .npz (truncated or corrupt?)"
  size = params.stat().st_size
  out = {}
  try:
    with zipfile.ZipFile(params) as z, open(params, "rb") as raw:
      for info in z.infolist():
        if not info.filename.endswith(".npy"):
          raise DictionaryFileError(f"{bad}: member {info.filename!r} is not an .npy array")
        name = info.filename[:-4]
        if info.flag_bits & 0x1:
          raise DictionaryFileError(f"{params}: member {info.filename!r} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
          raw.seek(info.header_offset)
          local = raw.read(30)
          if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise DictionaryFileError(f"{bad}: member {info.filename!r} has no local header")
          start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
              int.from_bytes(local[28:30], "little")
          raw.seek(start)
          shape, dtype, fortran, hlen = _npy_header(raw, f"{params}:{info.filename}")
          offset, compression = start + hlen, None
          if start + info.file_size > size:
            raise DictionaryFileError(
                f"{bad}: member {info.filename!r} needs bytes up to {start + info.file_size}"
                f" but the file holds {size}")
        else:
          with z.open(info) as fp:
            shape, dtype, fortran, hlen = _npy_header(fp, f"{params}:{info.filename}")
          offset = None
          compression = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                         zipfile.ZIP_LZMA: "lzma"}.get(info.compress_type,
                                                       str(info.compress_type))
        t = _Stored(shape, dtype, params, offset, fortran, info.filename, compression)
        if hlen + t.nbytes != info.file_size:
          raise DictionaryFileError(
              f"{bad}: member {info.filename!r} says it holds {dtype} {shape} "
              f"({t.nbytes} bytes after its {hlen}-byte header) but is {info.file_size} "
              "bytes long")
        out[name] = t
  except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
    if isinstance(e, DictionaryFileError):
      raise
    raise DictionaryFileError(f"{bad}: {e}") from e
  return out


def _npy_header(fp, where: str):
  """(shape, dtype, fortran_order, header bytes) of an .npy stream; refuses pickled data."""
  magic = fp.read(8)
  if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
    raise DictionaryFileError(f"{where} is not an .npy array (no magic)")
  major = magic[6]
  if major == 1:
    n, lsize = int.from_bytes(fp.read(2), "little"), 2
  elif major in (2, 3):
    n, lsize = int.from_bytes(fp.read(4), "little"), 4
  else:
    raise DictionaryFileError(f"{where}: unknown .npy format version {major}")
  text = fp.read(n)
  if len(text) < n:
    raise DictionaryFileError(f"{where}: the .npy header is truncated")
  try:
    h = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
    dtype = np.lib.format.descr_to_dtype(h["descr"])
    shape, fortran = tuple(int(s) for s in h["shape"]), bool(h["fortran_order"])
  except (ValueError, SyntaxError, KeyError, TypeError) as e:
    raise DictionaryFileError(f"{where}: unreadable .npy header {text[:200]!r}") from e
  if dtype.hasobject:
    raise DictionaryFileError(
        f"{where} holds Python objects, which only pickle could read; refused (dictionaries "
        "are plain float arrays)")
  return shape, dtype, fortran, 8 + lsize + n


# ------------------------------------------------------------------ reading tensors


_CHUNK_BYTES = 16 << 20  # File bytes per read: small next to any tensor worth chunking.
_ALIGN = 64              # jax on CPU aliases 64-byte aligned numpy buffers, copies others.


def _empty(shape, dtype) -> np.ndarray:
  """An uninitialised C-order array whose data is 64-byte aligned (see _ALIGN)."""
  n = math.prod(shape) * np.dtype(dtype).itemsize
  buf = np.empty(n + _ALIGN, np.uint8)
  start = (-buf.ctypes.data) % _ALIGN
  return buf[start:start + n].view(dtype).reshape(shape)


def _bounds(index, shape) -> list[tuple[int, int]]:
  out = []
  for sl, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
    start, stop, step = sl.indices(n)
    assert step == 1, index
    out.append((start, stop))
  return out


class _Reader:
  """Reads regions of one file's tensors into preallocated arrays, chunk by chunk.

  Plain positioned reads (no memory map): pages of a mapped file would count in the
  process's resident memory for as long as the mapping lives.
  """

  def __init__(self, path: Path, *, check_finite: bool, where: str):
    self.path, self.where, self.check_finite = path, where, check_finite
    self.file = open(path, "rb", buffering=0)
    self.buf = None
    self._whole = {}  # Compressed members, decompressed once per load.

  def forget(self):
    """Drops decompressed members kept for the tensor just placed."""
    self._whole.clear()

  def close(self):
    self.file.close()
    self.buf = None
    self.forget()

  def _scratch(self, nbytes: int) -> memoryview:
    if self.buf is None or len(self.buf) < nbytes:
      self.buf = bytearray(max(nbytes, min(_CHUNK_BYTES, 1 << 20)))
    return memoryview(self.buf)[:nbytes]

  def _pread(self, view: memoryview, offset: int):
    self.file.seek(offset)
    got = 0
    while got < len(view):
      k = self.file.readinto(view[got:])
      if not k:
        raise DictionaryFileError(
            f"{self.where} is not readable (truncated or corrupt?): it ended at byte "
            f"{offset + got} while its header promised more (did it change while "
            "loading?)")
      got += k

  def read(self, field: str, t: _Stored, index, out: np.ndarray) -> int:
    """Fills ``out`` with ``t[index]`` converted to out.dtype; returns file bytes read."""
    if t.offset is None:
      return self._read_compressed(field, t, index, out)
    bounds = _bounds(index, t.shape)
    if t.fortran and t.ndim >= 2:  # The file holds the transpose in C order.
      return self._read_c(field, t.offset, t.shape[::-1], t.dtype, bounds[::-1], out.T)
    return self._read_c(field, t.offset, t.shape, t.dtype, bounds, out)

  def _read_c(self, field, offset, shape, dtype, bounds, out) -> int:
    item = dtype.itemsize
    if len(shape) == 0:
      shape, bounds, out = (1,), [(0, 1)], out.reshape(1)
    (r0, r1), rest = bounds[0], bounds[1:]
    if any(b != (0, n) for b, n in zip(rest[1:], shape[2:])):
      raise NotImplementedError(f"reading {field} split along an axis after the second")
    row_elems = math.prod(shape[1:])
    c0, c1 = rest[0] if rest else (0, 1)
    inner = math.prod(shape[2:])  # Elements per index of the second axis.
    full_rows = (c0, c1) == (0, shape[1] if len(shape) > 1 else 1)
    span = (c1 - c0) * inner  # Elements this region takes from each row.
    out2 = out.reshape(r1 - r0, span)
    if out2.size and not np.shares_memory(out2, out):
      raise NotImplementedError(f"reading {field} into a non-contiguous layout")
    step = max(1, _CHUNK_BYTES // max(1, span * item))
    read = 0
    for a in range(r0, r1, step):
      b = min(r1, a + step)
      view = self._scratch((b - a) * span * item)
      if full_rows:
        self._pread(view, offset + a * row_elems * item)
      else:  # One read per row: the column block of each row is contiguous.
        for i, r in enumerate(range(a, b)):
          self._pread(view[i * span * item:(i + 1) * span * item],
                      offset + (r * row_elems + c0 * inner) * item)
      chunk = np.frombuffer(view, dtype).reshape(b - a, span)
      dst = out2[a - r0:b - r0]
      dst[...] = chunk
      self._check(field, dst, dtype)
      read += len(view)
    return read

  def _read_compressed(self, field, t: _Stored, index, out) -> int:
    read = 0
    whole = self._whole.get(field)
    if whole is None:  # A compressed member is a stream: decompress it once, chunked.
      # A Fortran-order member holds the transpose in C order.
      stream_order = _empty(t.shape[::-1] if t.fortran else t.shape, out.dtype)
      whole = stream_order.T if t.fortran else stream_order
      flat = stream_order.reshape(-1)
      with zipfile.ZipFile(t.path) as z, z.open(t.member) as fp:
        _npy_header(fp, f"{t.path}:{t.member}")
        step = max(1, _CHUNK_BYTES // t.dtype.itemsize)
        for a in range(0, flat.size, step):
          b = min(flat.size, a + step)
          data = fp.read((b - a) * t.dtype.itemsize)
          if len(data) != (b - a) * t.dtype.itemsize:
            raise DictionaryFileError(
                f"{t.path} is not a readable .npz (truncated or corrupt?): member "
                f"{t.member!r} ended early")
          flat[a:b] = np.frombuffer(data, t.dtype)
          self._check(field, flat[a:b], t.dtype)
          read += len(data)
        fp.read(1)  # Reaching the end makes zipfile check the member's CRC.
      self._whole[field] = whole
    out[...] = whole[tuple(index)]
    return read

  def _check(self, field, a, stored_dtype):
    if self.check_finite and not np.isfinite(a).all():
      converted = f" after conversion from {stored_dtype} to {a.dtype}" if (
          a.dtype != stored_dtype) else ""
      raise DictionaryFileError(
          f"{self.where}: {field} has non-finite values (NaN or inf){converted}; pass "
          "check_finite=False to load it anyway")


def _materialize(layout: dict[str, _Stored], cfg: dict, *, source: str, where: str,
                 opts: _Options) -> Dictionary:
  """Checks everything the headers show, then reads (or maps) each tensor."""
  stub = _build(layout, cfg, source=source, where=where)  # Raises before any allocation.
  stored = {name: getattr(stub, name) for name in _FIELDS if getattr(stub, name) is not None}
  if opts.mmap:
    return stub.replace(**_mapped(stored, where=where, opts=opts))
  shardings = _field_shardings(opts, stub)
  reader = _Reader(layout[_CORE[0]].path, check_finite=opts.check_finite, where=where)
  try:
    arrays = {}
    for name, t in stored.items():
      dtype = opts.dtype if opts.dtype is not None else np.dtype(
          jax.dtypes.canonicalize_dtype(t.dtype))  # As jnp.asarray would store it.
      arrays[name] = _place(reader, name, t, dtype, shardings[name], opts.stats)
      reader.forget()
  finally:
    reader.close()
  return stub.replace(**arrays)


_FIELDS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip")


def _place(reader: _Reader, name: str, t: _Stored, dtype, sharding, stats) -> jax.Array:
  if sharding is None:
    out = _empty(t.shape, dtype)
    read = reader.read(name, t, (), out)
    if stats is not None:
      stats._add(None, read, t.nbytes)
    return jax.device_put(out)  # Aliases `out` on CPU (aligned), copies to accelerators.
  index_map = sharding.addressable_devices_indices_map(t.shape)
  groups = {}  # Devices holding the same slice (replicas) share one read.
  for device, index in index_map.items():
    key = tuple(_bounds(index, t.shape))
    groups.setdefault(key, []).append(device)
  placed = {}
  for key, devices in groups.items():
    index = tuple(slice(a, b) for a, b in key)
    out = _empty(tuple(b - a for a, b in key), dtype)
    read = reader.read(name, t, index, out)
    held = math.prod(out.shape) * t.dtype.itemsize
    for i, device in enumerate(devices):
      placed[device] = jax.device_put(out, device)
      if stats is not None:
        stats._add(device, read if i == 0 else 0, held)
    del out
  return jax.make_array_from_single_device_arrays(
      t.shape, sharding, [placed[dev] for dev in index_map])


def _mapped(stored: dict, *, where: str, opts: _Options) -> dict:
  arrays = {}
  for name, t in stored.items():
    if t.offset is None:
      raise DictionaryFileError(
          f"{where}: member {t.member!r} is compressed ({t.compression}), and a compressed "
          "member cannot be memory-mapped. Load with mmap=False (it is then decompressed "
          "in chunks, converted as it goes), or re-save the arrays uncompressed with "
          "np.savez")
    if opts.dtype is not None and opts.dtype != t.dtype:
      raise ValueError(
          f"mmap=True maps {name} in its stored dtype {t.dtype}, so it cannot become "
          f"{opts.dtype}; drop dtype=, or load with mmap=False to convert while reading")
    if t.nbytes == 0:
      arrays[name] = np.empty(t.shape, t.dtype)
    else:
      arrays[name] = np.memmap(t.path, t.dtype, mode="r", offset=t.offset, shape=t.shape,
                               order="F" if t.fortran else "C")
  if opts.check_finite:  # One chunked scan with positioned reads: the maps stay untouched.
    reader = _Reader(next(iter(stored.values())).path, check_finite=True, where=where)
    try:
      for name, t in stored.items():
        if t.nbytes:
          for index, shape in _row_blocks(t):
            read = reader.read(name, t, index, np.empty(shape, t.dtype))
            if opts.stats is not None:
              opts.stats._add(None, read, 0)
    finally:
      reader.close()
  return arrays


def _row_blocks(t: _Stored):
  rows = t.shape[0] if t.ndim else 1
  per_row = max(1, t.nbytes // max(1, rows))
  step = max(1, _CHUNK_BYTES // per_row)
  for a in range(0, rows, step):
    b = min(rows, a + step)
    if t.ndim == 0:
      yield (), ()
    else:
      yield (slice(a, b),), (b - a,) + t.shape[1:]


# ------------------------------------------------------------------------ shardings


def _field_shardings(opts: _Options, stub: Dictionary) -> dict:
  """The Sharding (or None: default device) each field gets; see ``load``'s docstring."""
  s = opts.sharding
  names = [n for n in _FIELDS if getattr(stub, n) is not None]
  if s is None:
    return dict.fromkeys(names)
  if isinstance(s, Mesh):
    mesh, axis = s, opts.width_axis
  elif isinstance(s, NamedSharding):
    mesh, spec = s.mesh, tuple(s.spec)
    if all(p is None for p in spec):
      return {n: NamedSharding(mesh, P()) for n in names}
    if len(spec) < 2 or spec[0] is not None or any(p is not None for p in spec[2:]):
      raise ValueError(
          f"sharding={s} is read as w_enc's sharding (d_in, width), so its spec must be "
          "P(None, <width axis>) (or P() to replicate everything); e.g. "
          "NamedSharding(mesh, P(None, 'width')), or pass the mesh itself with width_axis=")
    axis = spec[1]
  elif isinstance(s, jax.sharding.Sharding) and s.is_fully_replicated:
    return dict.fromkeys(names, s)
  else:
    raise TypeError(
        f"sharding must be a jax.sharding.Mesh, a NamedSharding (w_enc's: P(None, "
        f"'width')) or a fully replicated Sharding, not {type(s).__name__}")
  axes = axis if isinstance(axis, tuple) else (axis,)
  for a in axes:
    if a not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}, not the width axis {a!r}")
  size = math.prod(mesh.shape[a] for a in axes)
  if stub.width % size:
    raise ValueError(
        f"width {stub.width} is not divisible by the {size} devices of mesh axis {axis!r}; "
        "use a width axis whose size divides the width (or replicate with P())")
  from dictlearn.sharding import dictionary_specs  # Lazily: it pulls in the kernels.
  specs = dictionary_specs(stub, axis)
  return {n: NamedSharding(mesh, getattr(specs, n)) for n in names}


# ------------------------------------------------------------------------------ hub


def split_hub_ref(ref: str) -> tuple[str, str]:
  """``"google/gemma-scope-2-1b-pt/resid_post/layer_22_..."`` -> (repo_id, folder)."""
  parts = ref.strip("/").split("/")
  if len(parts) < 2:
    raise ValueError(f"hub reference {ref!r} must be owner/repo[/folder]")
  return "/".join(parts[:2]), "/".join(parts[2:])


def _load_hub(ref: str, *, revision, cache_dir, opts: _Options) -> Dictionary:
  from huggingface_hub import errors as hf_errors
  from huggingface_hub import hf_hub_download

  repo_id, folder = split_hub_ref(ref)
  remote_missing = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)

  def fetch(name):
    filename = f"{folder}/{name}" if folder else name
    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))

  try:
    if folder.split("/")[0] == "clt":  # Cross-layer transcoders: one file per layer.
      from huggingface_hub import snapshot_download
      local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                allow_patterns=[f"{folder}/*"])
      return _read_clt(Path(local) / folder, opts)
    try:
      params = fetch(PARAMS_FILE)
    except hf_errors.EntryNotFoundError:
      return _read_gs1(fetch(GS1_PARAMS_FILE), source=ref, opts=opts)  # Gemma Scope 1 repos.
    try:
      config = fetch(CONFIG_FILE)
    except remote_missing:  # Only a config the hub lacks is optional; offline is an error.
      config = params.with_name("__no_config__.json")
    return _read_gs2(params, config, source=ref, opts=opts)
  except hf_errors.LocalEntryNotFoundError as e:
    raise FileNotFoundError(
        f"{ref} is not in the local huggingface_hub cache and the hub cannot be reached "
        "(offline, or HF_HUB_OFFLINE=1). Download it where there is a network, e.g. "
        f"`hf download {repo_id} --include '{folder}/*' --local-dir DIR`, then pass "
        f"DIR/{folder} (a folder with params.safetensors and config.json) instead.") from e
  except hf_errors.GatedRepoError as e:
    raise PermissionError(
        f"{repo_id} is gated: accept its licence on the hub and log in (`hf auth login` "
        "or HF_TOKEN), then try again.") from e
  except hf_errors.RepositoryNotFoundError as e:
    raise FileNotFoundError(
        f"no hub repository {repo_id!r} (or no access to it); see dictlearn.catalog for "
        "the Gemma Scope 2 repositories") from e
  except hf_errors.RevisionNotFoundError as e:
    raise FileNotFoundError(f"{repo_id} has no revision {revision!r}") from e
  except hf_errors.EntryNotFoundError as e:
    raise FileNotFoundError(
        f"{repo_id} has no dictionary at {folder!r}: neither {PARAMS_FILE} nor "
        f"{GS1_PARAMS_FILE} is there; see dictlearn.catalog for folder names") from e
