"""Gemma 3 from a GGUF file (llama.cpp's format): weights dequantized with the ``gguf`` package.

``gguf.GGUFReader`` builds one numpy view per element of every metadata array, which for
Gemma's 262144-piece vocabulary (three arrays) takes about a minute on a laptop CPU. This
module reads the header itself, in bulk, using the ``gguf`` package's definitions of the
format (value types, quantization block sizes), and dequantizes tensors with
``gguf.quants.dequantize`` from a memory map.

llama.cpp's Gemma 3 tensors are transformers' matrices (out, in) under other names, with
every RMSNorm weight stored as ``1 + scale`` (llama.cpp multiplies by the stored weight);
we subtract the 1 to get the canonical tree (see ``dictlearn_gemma.params``).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

from dictlearn_gemma.config import Gemma2Config, gemma2_preset_for
from dictlearn_gemma.load_safetensors import hf_to_gemma_params

# llama.cpp name -> transformers name (per block, then global).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def _gguf():
  try:
    import gguf
  except ImportError as e:
    raise ImportError("reading GGUF files needs the gguf package: pip install 'dictlearn[gemma]'"
                      ) from e
  return gguf


def supported_types() -> list[str]:
  """GGUF tensor types this loader can dequantize (those ``gguf.quants`` implements)."""
  gguf = _gguf()
  traits = getattr(gguf.quants, "_type_traits", {})
  kinds = [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *traits]
  return sorted({k.name for k in kinds})


@dataclasses.dataclass
class GGUFTensor:
  name: str
  type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # numpy order (llama.cpp's ne reversed)
  offset: int  # absolute byte offset in the file


@dataclasses.dataclass
class GGUFFile:
  """A parsed GGUF header: metadata values and tensor locations; data stays memory-mapped."""

  path: str
  metadata: dict[str, Any]
  tensors: dict[str, GGUFTensor]
  _map: np.memmap

  def raw(self, name: str) -> np.ndarray:
    """The tensor's bytes as uint8 (rows, bytes per row), as ``gguf.quants`` expects."""
    gguf = _gguf()
    t = self.tensors[name]
    block, size = gguf.GGML_QUANT_SIZES[t.type]
    row = t.shape[-1]
    if row % block:
      raise ValueError(f"{self.path}: tensor {name} row of {row} is not a multiple of the "
                       f"{t.type.name} block size {block}")
    rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    row_bytes = row // block * size
    data = self._map[t.offset:t.offset + rows * row_bytes]
    if data.size != rows * row_bytes:
      raise ValueError(f"{self.path} is truncated: tensor {name} runs past the end of the file")
    return data.reshape(*t.shape[:-1], row_bytes)

  def dequantize(self, name: str) -> np.ndarray:
    """The tensor as float32, numpy shape."""
    gguf = _gguf()
    t = self.tensors[name]
    out = gguf.quants.dequantize(self.raw(name), t.type)
    return np.asarray(out, dtype=np.float32).reshape(t.shape)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
  """Parses a GGUF file's header (version 2 or 3, little-endian)."""
  gguf = _gguf()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path!r}")
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  buf = memoryview(mm)
  pos = 0

  def take(fmt):
    nonlocal pos
    values = struct.unpack_from("<" + fmt, buf, pos)
    pos += struct.calcsize("<" + fmt)
    return values[0] if len(values) == 1 else values

  def string():
    nonlocal pos
    n = take("Q")
    s = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
    pos += n
    return s

  V = gguf.GGUFValueType
  scalar = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I",
            V.INT32: "i", V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q",
            V.FLOAT64: "d"}

  def value(kind):
    nonlocal pos
    kind = V(kind)
    if kind == V.STRING:
      return string()
    if kind == V.ARRAY:
      item, n = V(take("I")), take("Q")
      if item == V.STRING:
        return [string() for _ in range(n)]
      if item == V.ARRAY:
        return [value(V.ARRAY) for _ in range(n)]
      dtype = np.dtype("<" + scalar[item])
      out = np.frombuffer(buf, dtype=dtype, count=n, offset=pos).copy()
      pos += n * dtype.itemsize
      return out
    return take(scalar[kind])

  if len(mm) < 24 or take("I") != gguf.GGUF_MAGIC:
    raise ValueError(f"{path!r} is not a GGUF file (bad magic number)")
  version = take("I")
  if version not in (2, 3):
    raise ValueError(f"{path!r}: GGUF version {version} is not supported (2 or 3; big-endian "
                     "files are not supported)")
  n_tensors, n_kv = take("Q"), take("Q")
  try:
    metadata = {}
    for _ in range(n_kv):
      key = string()
      metadata[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
      name = string()
      dims = [take("Q") for _ in range(take("I"))]
      kind, offset = take("I"), take("Q")
      infos.append((name, dims, kind, offset))
  except (struct.error, ValueError) as e:
    raise ValueError(f"{path!r}: corrupt or truncated GGUF header ({e})") from e
  align = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
  start = (pos + align - 1) // align * align
  tensors = {}
  for name, dims, kind, offset in infos:
    try:
      qtype = gguf.GGMLQuantizationType(kind)
    except ValueError:
      qtype = kind  # Unknown to this gguf version; reported when the tensor is needed.
    tensors[name] = GGUFTensor(name, qtype, tuple(int(d) for d in reversed(dims)), start + offset)
  return GGUFFile(path, metadata, tensors, mm)


def gguf_to_gemma_params(gf: GGUFFile, architectures: tuple[str, ...] = ("gemma3",)
                         ) -> dict[str, np.ndarray]:
  """A Gemma 3 (or, if ``architectures`` allows, Gemma 2) GGUF's tensors -> the canonical
  flax-named tree (float32). llama.cpp names Gemma 2's tensors as Gemma 3's, without the
  QK-norms, and stores its norms as ``1 + scale`` too.

  Raises:
    ValueError: not a Gemma 3 file, missing tensors, or tensor types we cannot dequantize.
  """
  arch = gf.metadata.get("general.architecture")
  if arch not in architectures:
    family = "Gemma 3" if architectures == ("gemma3",) else "Gemma"
    hint = (" Gemma 2 loads with dictlearn_penzai.load_gemma (or dictlearn_gemma."
            "load_checkpoint)." if arch == "gemma2" else "")
    raise ValueError(f"{gf.path!r} is not a {family} GGUF: general.architecture is {arch!r} "
                     f"(expected {' or '.join(map(repr, architectures))}).{hint}")
  names = {}
  for name in gf.tensors:
    base = name.removesuffix(".weight")
    if base.startswith("blk."):
      _, i, part = base.split(".", 2)
      if part in _BLOCK_NAMES:
        names[name] = f"model.layers.{i}.{_BLOCK_NAMES[part]}.weight"
    elif base in _GLOBAL_NAMES:
      names[name] = f"{_GLOBAL_NAMES[base]}.weight"
  supported = set(supported_types())
  bad = [f"{n} ({getattr(gf.tensors[n].type, 'name', gf.tensors[n].type)})" for n in names
         if getattr(gf.tensors[n].type, "name", None) not in supported]
  if bad:
    raise ValueError(f"{gf.path!r}: cannot dequantize tensor type(s) of " + ", ".join(bad[:8])
                     + ". Supported GGUF types: " + ", ".join(supported_types()))
  tensors = {hf: gf.dequantize(name) for name, hf in names.items()}
  head_dim = gguf_gemma2_config(gf).head_dim if arch == "gemma2" else None
  return hf_to_gemma_params(tensors, norm_offset=1.0, source=gf.path, gemma2_head_dim=head_dim)


def gguf_gemma2_config(gf: GGUFFile) -> Gemma2Config:
  """The ``Gemma2Config`` a ``gemma2`` GGUF's metadata describes.

  llama.cpp does not store ``query_pre_attn_scalar`` (it derives 27B's d_model / heads from
  the size): it is taken from the preset of these sizes, else head_dim.

  Raises:
    ValueError: a size key missing from the metadata.
  """
  md = gf.metadata

  def get(key, default=None):
    value = md.get(f"gemma2.{key}", default)
    if value is None:
      raise ValueError(f"{gf.path!r}: Gemma 2 GGUF metadata lacks gemma2.{key}")
    return value.item() if hasattr(value, "item") else value

  d, n = int(get("embedding_length")), int(get("attention.head_count"))
  sizes = dict(num_layers=int(get("block_count")), d_model=d, num_heads=n,
               num_kv_heads=int(get("attention.head_count_kv", n)),
               head_dim=int(get("attention.key_length", d // n)),
               hidden_dim=int(get("feed_forward_length")))
  preset = gemma2_preset_for(sizes)
  emb = gf.tensors.get("token_embd.weight")
  return Gemma2Config(
      **sizes, name=preset.name if preset else "custom",
      vocab_size=emb.shape[0] if emb is not None else 256_000,
      sliding_window=int(get("attention.sliding_window", 4096)),
      rope_base=float(get("rope.freq_base", 10_000.0)),
      query_pre_attn_scalar=preset.query_pre_attn_scalar if preset else None,
      attn_logit_softcap=float(get("attn_logit_softcapping", 50.0)),
      final_logit_softcap=float(get("final_logit_softcapping", 30.0)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)))


def load_gguf_params(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], GGUFFile]:
  """(canonical params, parsed file) for a Gemma 3 GGUF."""
  gf = read_gguf(path)
  return gguf_to_gemma_params(gf), gf
