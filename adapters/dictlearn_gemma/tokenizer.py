"""The Gemma 3 tokenizer: SentencePiece, from a ``.model`` file or rebuilt from GGUF metadata.

Gemma 3's vocabulary (262144 pieces, BPE, byte fallback, digits split, no dummy prefix,
no whitespace collapsing) keeps runs of spaces (ids 138-167), runs of newlines and tabs,
and HTML tags as USER_DEFINED pieces. GGUF files (and the hub's added-token lists) spell
the space runs with literal spaces. SentencePiece turns spaces into ``▁`` *before* it
matches pieces, so a piece written with literal spaces can never match: rebuilt naively,
``"    if"`` becomes ``▁ ▁ ▁ ▁if`` instead of ``▁▁▁▁ if``. We respell whitespace-only
user-defined pieces with ``▁`` so SentencePiece matches them as the reference tokenizers
(transformers, llama.cpp) do.

Control pieces (``<bos>``, ``<start_of_turn>``, ``<end_of_turn>``, ``<unusedN>``, ...)
are never produced by SentencePiece from text; like transformers, ``encode`` maps their
literal text to their ids, so chat-formatted strings tokenize correctly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

_Type = sp_pb.ModelProto.SentencePiece.Type
_SPECIAL_TYPES = (_Type.CONTROL, _Type.UNKNOWN)
_TAG = re.compile(r"<[^<>\s]{1,64}>")

# Gemma 3 ids, used when a tokenizer object does not say (see ``special_ids``).
GEMMA3_IDS = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, start_of_turn_id=105,
                  end_of_turn_id=106)


def _respell_whitespace_pieces(proto: sp_pb.ModelProto) -> int:
  """Writes whitespace-only user-defined pieces with ``▁``; returns how many changed."""
  changed = 0
  for piece in proto.pieces:
    if piece.type == _Type.USER_DEFINED and " " in piece.piece and not piece.piece.strip(" "):
      piece.piece = piece.piece.replace(" ", "\u2581")
      changed += 1
  return changed


class Tokenizer:
  """Gemma 3 text <-> token ids.

  Build with ``Tokenizer.from_file(path)`` (a SentencePiece ``tokenizer.model``) or
  ``Tokenizer.from_gguf(path)``; ``dictlearn_gemma.load_params`` returns one.

  Attributes:
    bos_id, eos_id, pad_id, unk_id, start_of_turn_id, end_of_turn_id: special ids.
    vocab_size: number of pieces.
  """

  def __init__(self, proto: sp_pb.ModelProto | bytes):
    if isinstance(proto, (bytes, bytearray)):
      parsed = sp_pb.ModelProto()
      parsed.ParseFromString(bytes(proto))
      proto = parsed
    _respell_whitespace_pieces(proto)
    self._proto = proto
    self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    self.vocab_size = self._sp.get_piece_size()
    self._special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in _SPECIAL_TYPES}
    self._special_ids = frozenset(self._special.values())
    untagged = [s for s in self._special if not _TAG.fullmatch(s)]
    longest_first = sorted(untagged, key=len, reverse=True)
    self._untagged_re = re.compile("|".join(map(re.escape, longest_first))) if untagged else None
    spec = proto.trainer_spec
    self.bos_id = spec.bos_id if spec.bos_id >= 0 else GEMMA3_IDS["bos_id"]
    self.eos_id = spec.eos_id if spec.eos_id >= 0 else GEMMA3_IDS["eos_id"]
    self.pad_id = spec.pad_id if spec.pad_id >= 0 else GEMMA3_IDS["pad_id"]
    self.unk_id = spec.unk_id
    self.start_of_turn_id = self._special.get("<start_of_turn>", GEMMA3_IDS["start_of_turn_id"])
    self.end_of_turn_id = self._special.get("<end_of_turn>", GEMMA3_IDS["end_of_turn_id"])

  # --- construction -------------------------------------------------------------------

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
    """From a SentencePiece model file (Gemma's ``tokenizer.model``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no SentencePiece model at {path!r}; Gemma checkpoints ship one "
                              "as tokenizer.model")
    with open(path, "rb") as f:
      data = f.read()
    try:
      return cls(data)
    except Exception as e:  # protobuf raises DecodeError; say what the file should be.
      raise ValueError(f"{path!r} is not a SentencePiece model file: {e}") from e

  @classmethod
  def from_vocabulary(cls, pieces: Sequence[str], scores: Sequence[float],
                      types: Sequence[int], *, bos_id: int = 2, eos_id: int = 1,
                      unk_id: int = 3, pad_id: int = 0) -> "Tokenizer":
    """From a GGUF-style vocabulary: pieces, BPE scores and SentencePiece piece types.

    GGUF's ``tokenizer.ggml.token_type`` uses SentencePiece's numbering (1 normal,
    2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    """
    if not (len(pieces) == len(scores) == len(types)):
      raise ValueError(f"vocabulary lists differ in length: {len(pieces)} pieces, "
                       f"{len(scores)} scores, {len(types)} types")
    proto = sp_pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type = sp_pb.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id = bos_id, eos_id, unk_id, pad_id
    # Gemma's normalizer: identity, keep every space, no dummy "▁" prefix; spaces -> "▁".
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    for piece, score, kind in zip(pieces, scores, types):
      p = proto.pieces.add()
      p.piece, p.score, p.type = piece, float(score), int(kind)
    return cls(proto)

  @classmethod
  def from_gguf(cls, source: Any) -> "Tokenizer":
    """From the ``tokenizer.ggml.*`` metadata of a GGUF file (path or ``dictlearn_gemma.load_gguf.GGUFFile``)."""
    from dictlearn_gemma.load_gguf import GGUFFile, read_gguf

    meta = (source if isinstance(source, GGUFFile) else read_gguf(source)).metadata
    if "tokenizer.ggml.tokens" not in meta:
      raise ValueError("this GGUF file has no tokenizer metadata (tokenizer.ggml.tokens)")
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
      raise ValueError(f"GGUF tokenizer model {kind!r} is not SentencePiece ('llama'); "
                       "not a Gemma 3 tokenizer")
    special = lambda name, default: int(meta.get(f"tokenizer.ggml.{name}", default))
    return cls.from_vocabulary(
        meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
        meta["tokenizer.ggml.token_type"], bos_id=special("bos_token_id", 2),
        eos_id=special("eos_token_id", 1), unk_id=special("unknown_token_id", 3),
        pad_id=special("padding_token_id", 0))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the (respelled) SentencePiece model, loadable with ``from_file``."""
    with open(path, "wb") as f:
      f.write(self._proto.SerializeToString())

  # --- text <-> ids --------------------------------------------------------------------

  def _segments(self, text: str) -> Iterable[tuple[bool, str]]:
    """Splits text into (is_special, substring) runs; special = a control piece's text."""
    spans = [(m.start(), m.end()) for m in _TAG.finditer(text) if m.group() in self._special]
    if self._untagged_re is not None:
      spans += [(m.start(), m.end()) for m in self._untagged_re.finditer(text)]
      spans.sort()
    pos = 0
    for start, end in spans:
      if start < pos:
        continue
      if start > pos:
        yield False, text[pos:start]
      yield True, text[start:end]
      pos = end
    if pos < len(text):
      yield False, text[pos:]

  def encode(self, text: str | Sequence[str], add_bos: bool = True, add_eos: bool = False
             ) -> list[int] | list[list[int]]:
    """Text -> ids (a list of texts -> a list of id lists). BOS first when ``add_bos``."""
    if not isinstance(text, str):
      return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in text]
    ids = [self.bos_id] if add_bos else []
    for special, part in self._segments(text):
      ids.extend([self._special[part]] if special else self._sp.encode(part))
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Ids -> text. Control tokens come out as their text (``<end_of_turn>``) unless skipped."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    out, run = [], []
    for i in ids:
      if i in self._special_ids:
        if run:
          out.append(self._sp.decode(run))
          run = []
        if not skip_special_tokens:
          out.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def split(self, text: str) -> list[str]:
    """The token strings ``text`` becomes (SentencePiece spelling: spaces as ``▁``), no BOS."""
    return [self._sp.id_to_piece(i) for i in self.encode(text, add_bos=False)]

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def __len__(self) -> int:
    return self.vocab_size

  # --- chat ----------------------------------------------------------------------------

  def apply_chat_template(self, messages: str | Sequence[dict], add_generation_prompt: bool = True
                          ) -> str:
    """Gemma's chat format (no BOS: ``encode`` adds it); see ``format_chat``."""
    return format_chat(messages, add_generation_prompt=add_generation_prompt)

  def encode_chat(self, messages: str | Sequence[dict], add_generation_prompt: bool = True
                  ) -> list[int]:
    return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=True)


def format_chat(messages: str | Sequence[dict], add_generation_prompt: bool = True) -> str:
  """Gemma instruction-tuned chat format, as its chat template writes it.

  ``"hi"`` or ``[{"role": "user", "content": "hi"}]`` ->
  ``"<start_of_turn>user\\nhi<end_of_turn>\\n<start_of_turn>model\\n"``. Roles: user,
  model (or assistant), and a leading system message, which Gemma folds into the first
  user turn (``system + "\\n\\n" + user``). Contents are stripped, as the template does.
  """
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  messages = list(messages)
  prefix = ""
  if messages and messages[0].get("role") == "system":
    prefix = str(messages[0]["content"]).strip() + "\n\n"
    messages = messages[1:]
  parts = []
  for n, message in enumerate(messages):
    role = message.get("role")
    if role == "assistant":
      role = "model"
    if role not in ("user", "model"):
      raise ValueError(f"chat role {role!r} is not one of user, model/assistant, system (first)")
    content = str(message.get("content", "")).strip()
    parts.append(f"<start_of_turn>{role}\n{prefix if n == 0 else ''}{content}<end_of_turn>\n")
  if add_generation_prompt:
    parts.append("<start_of_turn>model\n")
  return "".join(parts)


def special_ids(tokenizer: Any) -> dict[str, int]:
  """bos/eos/pad/end_of_turn ids of any tokenizer object (ours, ``gm.text.Gemma3Tokenizer``).

  Reads ``bos_id``-style attributes, then a ``special_tokens`` namespace (the gemma
  library's), then falls back to Gemma 3's ids.
  """
  out = dict(GEMMA3_IDS)
  st = getattr(tokenizer, "special_tokens", None)
  for key, alt in (("bos_id", "BOS"), ("eos_id", "EOS"), ("pad_id", "PAD"),
                   ("start_of_turn_id", "START_OF_TURN"), ("end_of_turn_id", "END_OF_TURN")):
    value = getattr(tokenizer, key, None)
    if value is None and st is not None:
      value = getattr(st, alt, None)
    if value is not None:
      out[key] = int(value)
  return out
