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

import json
import os
import re
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dictlearn import sites
from dictlearn.dictionary import DictMeta, Dictionary, JumpReLUSAE, Transcoder

PARAMS_FILE = "params.safetensors"
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
  from safetensors.numpy import save_file

  d.validate()
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = {name: np.asarray(getattr(d, name)) for name in _CORE}
  if d.w_skip is not None:
    tensors[_SKIP] = np.asarray(d.w_skip)
  # Write to a temporary name first so an interrupted save never leaves a truncated file
  # where a good one was.
  tmp = folder / (PARAMS_FILE + ".tmp")
  save_file(tensors, str(tmp))
  os.replace(tmp, folder / PARAMS_FILE)
  (folder / CONFIG_FILE).write_text(json.dumps(_config_of(d), indent=2) + "\n")
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


def load(ref: str | os.PathLike, *, revision: str | None = None,
         cache_dir: str | os.PathLike | None = None, dtype=None,
         check_finite: bool = True) -> Dictionary:
  """Loads a dictionary from a folder, a params file, or a hub reference.

  Args:
    ref: a local folder holding ``params.safetensors`` (+ ``config.json``) or
      ``params.npz``; one of those files; or ``owner/repo/<path>`` on the hub, e.g.
      ``google/gemma-scope-2-1b-pt/resid_post/layer_22_width_65k_l0_medium``.
    revision: hub revision (branch, tag or commit) to pin.
    cache_dir: huggingface_hub cache folder (its default otherwise).
    dtype: cast the weights (e.g. ``jnp.bfloat16``); default keeps the stored dtype.
    check_finite: refuse weights with NaN or inf.

  Returns:
    A ``JumpReLUSAE`` or ``Transcoder`` whose ``meta`` names its site, layer and source.
  """
  path = Path(ref)
  if path.exists():
    d = _load_local(path)
  elif _looks_like_hub_ref(str(ref)):
    d = _load_hub(str(ref), revision=revision, cache_dir=cache_dir)
  else:
    raise FileNotFoundError(
        f"{ref!s} is neither a local file or folder nor a hub reference of the form "
        "owner/repo/<folder>, e.g. google/gemma-scope-2-270m-pt/resid_post/"
        "layer_9_width_16k_l0_small")
  if dtype is not None:
    d = d.astype(dtype)
  return d.validate(check_finite=check_finite)


def _looks_like_hub_ref(ref: str) -> bool:
  return len(ref.strip("/").split("/")) >= 2 and not ref.startswith((".", "/", "~"))


def _load_local(path: Path) -> Dictionary:
  if path.is_dir():
    if (path / PARAMS_FILE).exists():
      return _read_gs2(path / PARAMS_FILE, path / CONFIG_FILE, source=str(path))
    if (path / GS1_PARAMS_FILE).exists():
      return _read_gs1(path / GS1_PARAMS_FILE, source=str(path))
    raise DictionaryFileError(
        f"{path} holds neither {PARAMS_FILE} (Gemma Scope 2) nor {GS1_PARAMS_FILE} "
        f"(Gemma Scope 1); found: {sorted(p.name for p in path.iterdir())[:10]}")
  if path.suffix == ".safetensors":
    return _read_gs2(path, path.with_name(CONFIG_FILE), source=str(path))
  if path.suffix == ".npz":
    return _read_gs1(path, source=str(path))
  raise DictionaryFileError(f"{path}: expected a .safetensors or .npz params file")


def _read_gs2(params: Path, config: Path, *, source: str) -> Dictionary:
  from safetensors.numpy import load_file

  try:
    tensors = load_file(str(params))
  except Exception as e:  # safetensors raises its own error types for bad headers.
    raise DictionaryFileError(
        f"{params} is not a readable safetensors file (truncated or corrupt?): {e}") from e
  cfg = {}
  if config.exists():
    try:
      cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
      raise DictionaryFileError(f"{config} is not valid JSON: {e}") from e
  return _build(tensors, cfg, source=source, where=str(params))


def _read_gs1(params: Path, *, source: str) -> Dictionary:
  try:
    with np.load(params, allow_pickle=False) as z:
      raw = {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise DictionaryFileError(f"{params} is not a readable .npz (truncated or corrupt?): {e}") from e
  tensors = {k.lower() if k in ("W_enc", "W_dec") else k: v for k, v in raw.items()}
  return _build(tensors, _gs1_config(source), source=source, where=str(params))


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
  arrays = {k: jnp.asarray(tensors[k]) for k in _CORE}
  try:
    if kind == "sae":
      if has_skip:
        raise DictionaryFileError(f"{where}: an SAE cannot have {_SKIP}; set type to transcoder")
      d = JumpReLUSAE(**arrays, meta=meta)
    else:
      d = Transcoder(**arrays, w_skip=jnp.asarray(tensors[_SKIP]) if has_skip else None,
                     meta=meta)
    return d.validate()
  except DictionaryFileError:
    raise
  except ValueError as e:
    raise DictionaryFileError(f"{where}: {e}") from e


# ------------------------------------------------------------------------------ hub


def split_hub_ref(ref: str) -> tuple[str, str]:
  """``"google/gemma-scope-2-1b-pt/resid_post/layer_22_..."`` -> (repo_id, folder)."""
  parts = ref.strip("/").split("/")
  if len(parts) < 2:
    raise ValueError(f"hub reference {ref!r} must be owner/repo[/folder]")
  return "/".join(parts[:2]), "/".join(parts[2:])


def _load_hub(ref: str, *, revision, cache_dir) -> Dictionary:
  from huggingface_hub import errors as hf_errors
  from huggingface_hub import hf_hub_download

  repo_id, folder = split_hub_ref(ref)
  remote_missing = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)

  def fetch(name):
    filename = f"{folder}/{name}" if folder else name
    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))

  try:
    try:
      params = fetch(PARAMS_FILE)
    except hf_errors.EntryNotFoundError:
      return _read_gs1(fetch(GS1_PARAMS_FILE), source=ref)  # Gemma Scope 1 repos.
    try:
      config = fetch(CONFIG_FILE)
    except remote_missing:  # Only a config the hub lacks is optional; offline is an error.
      config = params.with_name("__no_config__.json")
    return _read_gs2(params, config, source=ref)
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
