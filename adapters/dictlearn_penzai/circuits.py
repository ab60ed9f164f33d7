"""Attribution graphs and graph-checking interventions on a penzai Gemma 3 or Gemma 2.

The definitions and the row computations are in ``dictlearn.attribution``; what is
penzai's lives here: finding the blocks, freezing attention patterns and norm scales with
penzai layers (``FrozenSoftmax``, ``FrozenRMSStandardize``), running the blocks on named
arrays with an MLP callback in place of each MLP, and reading the frozen blocks out as
``attribution.LinearBlocks`` arrays.

A frozen layer passes no gradient. With the ``dictlearn_record`` side input (a dict) it
stores its value there under its key (its path within its block); with ``dictlearn_frozen``
(such a dict) it returns the stored value instead of computing one, so a run can replay a
clean run's patterns and scales exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from dictlearn import attribution
from dictlearn.graphs import Graph
from dictlearn_penzai.hookpoint import HookPoint
from dictlearn_penzai.hooks import remove_hooks

NamedArray = pz.nx.NamedArray


def _frozen(self, compute, side_inputs):
  frozen = side_inputs.get("dictlearn_frozen")
  if frozen is not None:
    return frozen[self.key]
  value = jax.tree_util.tree_map(jax.lax.stop_gradient, compute())
  record = side_inputs.get("dictlearn_record")
  if record is not None:
    record[self.key] = value
  return value


@pz.pytree_dataclass
class FrozenSoftmax(pz.nn.Layer):
  """An attention pattern that carries no gradient (and can be recorded or replayed)."""

  softmax: pz.nn.Softmax
  key: str = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    return _frozen(self, lambda: self.softmax(x), side_inputs)


@pz.pytree_dataclass
class FrozenRMSStandardize(pz.nn.Layer):
  """``pz.nn.RMSStandardize`` whose scale 1/rms(x) carries no gradient (same rounding)."""

  across: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
  epsilon: Any
  key: str = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: NamedArray, **side_inputs) -> NamedArray:
    flat = x.untag(*self.across)
    scale = _frozen(self, lambda: pz.nx.nmap(
        lambda v: jax.lax.rsqrt(jnp.mean(jnp.square(v)) + self.epsilon))(flat), side_inputs)
    return pz.nx.nmap(lambda v, s: v * s)(flat, scale).tag(*self.across)


@pz.pytree_dataclass
class _Block(pz.Struct):
  """One transformer block without its HookPoints: the attention residual, the norm
  before the MLP (its output is mlp_in) and the MLP with its post-norm (output mlp_out)."""

  attention: pz.nn.Layer
  pre_mlp: pz.nn.Layer
  mlp: pz.nn.Layer


def _split_block(i: int, block) -> _Block:
  subs = list(block.sublayers)
  residuals = [s for s in subs if isinstance(s, pz.nn.Residual)]
  bad = ValueError(f"block {i} is not a Gemma block from dictlearn_penzai.from_gemma_params "
                   "(residual attention, then a residual MLP with mlp_in/mlp_out HookPoints)")
  if len(residuals) != 2:
    raise bad
  inner = list(residuals[1].delta.sublayers)
  kinds = [(j, s.kind) for j, s in enumerate(inner) if isinstance(s, HookPoint)]
  at = dict((k, j) for j, k in kinds)
  if "mlp_in" not in at or "mlp_out" not in at:
    raise bad
  return _Block(attention=residuals[0], pre_mlp=pz.nn.Sequential(inner[:at["mlp_in"]]),
                mlp=pz.nn.Sequential(inner[at["mlp_in"] + 1:at["mlp_out"]]))


def _canonical(layer):
  """``layer`` ready for attribution: parameters frozen and unlabelled, HookPoints dropped,
  norms and softmaxes frozen and keyed by their path within ``layer``. Blocks of one
  structure then have one pytree structure, which ``_apply`` traces once."""
  layer = pz.select(pz.freeze_params(layer)).at_instances_of(pz.ParameterValue).apply(
      lambda p: dataclasses.replace(p, label=""))
  layer = pz.select(layer).at_instances_of(HookPoint).apply(lambda _: pz.nn.Identity())
  return _freeze_layers(layer)


def _freeze_layers(tree):
  def rms(path, layer):
    across = (layer.across,) if isinstance(layer.across, str) else tuple(layer.across)
    return FrozenRMSStandardize(across=across, epsilon=layer.epsilon,
                                key=jax.tree_util.keystr(path))
  tree = pz.select(tree).at_instances_of(pz.nn.RMSStandardize).apply(rms, with_keypath=True)
  return pz.select(tree).at_instances_of(pz.nn.Softmax).apply(
      lambda path, s: FrozenSoftmax(softmax=s, key=jax.tree_util.keystr(path)),
      with_keypath=True)


def _wrap(v):
  return pz.nx.wrap(v).tag("seq", "embedding")


def _plain(v):
  return v.unwrap("seq", "embedding").astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="record")
def _apply(layer, x, positions, frozen, record):
  """``layer(x)`` on a (seq, embedding) named array, and what its frozen layers recorded
  (None unless ``record``). A jitted call of its own, so that layers of one structure
  (``_canonical``: every local-attention block's attention, say) are traced once."""
  rec = {} if record else None
  y = layer(x, token_positions=positions, dictlearn_frozen=frozen, dictlearn_record=rec)
  return y, rec


def _run_blocks(params, x0, mlp, frozen=None, record=None):
  """``attribution.LinearizableModel.forward`` for the parts built by ``linearizable``;
  what it records is ``{"blocks": [per block {key: value}], "final": {key: value}}``."""
  blocks, final_norm = params
  positions = pz.nx.arange("seq", x0.shape[0])
  keep = record is not None
  recorded = []
  x = _wrap(x0)
  for layer, block in enumerate(blocks):
    fz = None if frozen is None else frozen["blocks"][layer]
    x, rec = _apply(block.attention, x, positions, fz, keep)
    h, rec_mlp = _apply(block.pre_mlp, x, positions, fz, keep)
    recorded.append({**rec, **rec_mlp} if keep else None)
    dtype = h.dtype
    real = lambda v, mlp_layer=block.mlp: _plain(
        _apply(mlp_layer, _wrap(v.astype(dtype)), positions, None, False)[0])
    x = x + _wrap(mlp(layer, _plain(h), real).astype(x.dtype))
  out, rec = _apply(final_norm, x, positions, None if frozen is None else frozen["final"],
                    keep)
  if keep:
    record.update(blocks=recorded, final=rec)
  return _plain(out)


def _value(p) -> NamedArray:
  """The array of a (frozen) parameter, or the array itself."""
  return p.value if hasattr(p, "value") else p


def _attention_arrays(attn: pz.nn.Attention, frozen):
  """(patterns (n_kv, group, q, k), w_v (n_kv, d, head_dim), w_o (n_kv, group, head_dim, d))
  of one frozen attention layer, in ``attribution.LinearBlocks``' layout."""
  find = lambda layer, kind: pz.select(layer).at_instances_of(kind).get_sequence()
  value, output = find(attn.input_to_value, pz.nn.Linear)[0], find(attn.attn_value_to_output,
                                                                    pz.nn.Linear)[-1]
  pattern = frozen[find(attn.query_key_to_attn, FrozenSoftmax)[0].key]
  shared = [a for a in value.out_axis_names if a != "projection"]  # heads, head_groups
  q_only = [a for a in pattern.named_shape if a not in (*shared, "seq", "kv_seq")]
  n_kv = int(np.prod([pattern.named_shape[a] for a in shared], dtype=int))
  group = int(np.prod([pattern.named_shape[a] for a in q_only], dtype=int))
  n = pattern.named_shape["seq"]
  patterns = pattern.unwrap(*shared, *q_only, "seq", "kv_seq").reshape(n_kv, group, n, n)
  w_v = _value(value.weights).unwrap(*shared, "embedding", "projection")
  w_v = w_v.reshape(n_kv, *w_v.shape[-2:])
  out_heads = [a for a in output.in_axis_names if a != "projection"]
  if set(out_heads) == {*shared, *q_only}:
    out_heads = [*shared, *q_only]
  # Otherwise ``MergeHeads`` flattened (shared, q_only) into one axis, group-major.
  w_o = _value(output.weights).unwrap(*out_heads, "projection", "embedding")
  return patterns, w_v, w_o.reshape(n_kv, group, *w_o.shape[-2:])


def _linear_blocks(params, frozen, n_pos: int, d: int) -> attribution.LinearBlocks:
  """``attribution.LinearizableModel.linear_blocks``. A frozen RMSNorm is elementwise in its
  input (recorded 1/rms times weight), so applied to ones it gives its multiplier; the
  attention arrays are read from the layers and the recorded patterns."""
  blocks, final_norm = params
  ones = _wrap(jnp.ones((n_pos, d), jnp.float32))
  positions = pz.nx.arange("seq", n_pos)
  multiplier = lambda layers, fz: _plain(pz.nn.Sequential(list(layers))(  # noqa: E731
      ones, token_positions=positions, dictlearn_frozen=fz, dictlearn_record=None))
  parts = {k: [] for k in ("attn_norm", "patterns", "w_v", "w_o", "attn_out_norm",
                           "mlp_norm")}
  for block, fz in zip(blocks, frozen["blocks"]):
    subs = list(block.attention.delta.sublayers)
    at = next(i for i, s in enumerate(subs) if isinstance(s, pz.nn.Attention))
    patterns, w_v, w_o = _attention_arrays(subs[at], fz)
    for key, value in (("attn_norm", multiplier(subs[:at], fz)), ("patterns", patterns),
                       ("w_v", w_v), ("w_o", w_o),
                       ("attn_out_norm", multiplier(subs[at + 1:], fz)),
                       ("mlp_norm", multiplier([block.pre_mlp], fz))):
      parts[key].append(value)
  return attribution.LinearBlocks(**{k: jnp.stack(v) for k, v in parts.items()},
                                  final_norm=multiplier([final_norm], frozen["final"]))


@dataclasses.dataclass(frozen=True)
class Linearized:
  """A penzai Gemma split for attribution: the core's model, the embedding layers and the
  unembedding."""

  model: attribution.LinearizableModel
  embed: Any
  family: str = "gemma3"

  def embeddings(self, tokens) -> jax.Array:
    """(n_pos, d) float32 scaled embeddings of token ids (n_pos,)."""
    return _embed(self.embed, jnp.asarray(tokens, jnp.int32).reshape(-1))


@jax.jit
def _embed(embed, ids):
  """One program (not one per penzai op) for ``Linearized.embeddings``."""
  return embed(pz.nx.wrap(ids).tag("seq")).unwrap("seq", "embedding").astype(jnp.float32)


def linearizable(model) -> Linearized:
  """Splits a Gemma 3 (``from_gemma_params``) or Gemma 2 (``from_gemma2_params``), hooks
  removed, for ``dictlearn.attribution``. Gemma 2's attention soft-cap sits before the
  frozen softmax, and its final logit soft-cap becomes ``logit_soft_cap``."""
  model = remove_hooks(model)
  body = list(model.body.sublayers)
  cap = None
  if body and isinstance(body[-1], pz.nn.TanhSoftCap):
    cap = float(body.pop().soft_cap)
  at = [i for i, s in enumerate(body) if isinstance(s, model_parts.TransformerBlock)]
  if not at or not isinstance(body[-1], pz.nn.EmbeddingDecode) or at != list(
      range(at[0], at[-1] + 1)):
    raise ValueError("attribution needs a Gemma model from dictlearn_penzai.from_gemma_params "
                     "or from_gemma2_params (embedding, transformer blocks, final norm, tied "
                     "unembedding, optional logit soft-cap)")
  blocks = tuple(_canonical(_split_block(i, body[j])) for i, j in enumerate(at))
  params = (blocks, _canonical(pz.nn.Sequential(body[at[-1] + 1:-1])))
  unembedding = _value(body[-1].table.embeddings).unwrap("vocabulary", "embedding")
  embed = pz.freeze_params(pz.nn.Sequential(body[:at[0]]))
  core = attribution.LinearizableModel(params=params, forward=_run_blocks,
                                       linear_blocks=_linear_blocks, unembedding=unembedding,
                                       n_layers=len(blocks), logit_soft_cap=cap)
  return Linearized(model=core, embed=embed, family="gemma2" if cap is not None else "gemma3")


_LINEARIZED: dict[int, tuple[weakref.ref, Linearized]] = {}


def _linearized(model) -> Linearized:
  """``model`` split once for as long as it lives: repeated calls on one model reuse the
  split (and its unembedding mean), and so the compiled clean run."""
  if isinstance(model, Linearized):
    return model
  key = id(model)
  hit = _LINEARIZED.get(key)
  if hit is not None and hit[0]() is model:
    return hit[1]
  lin = linearizable(model)
  try:
    ref = weakref.ref(model, lambda _, key=key: _LINEARIZED.pop(key, None))
  except TypeError:  # Not weakly referable: split it again next time.
    return lin
  _LINEARIZED[key] = (ref, lin)
  return lin


def _token_ids(tokens) -> np.ndarray:
  ids = np.asarray(tokens)
  if ids.ndim == 2 and ids.shape[0] == 1:
    ids = ids[0]
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError("tokens must be one prompt's token ids (seq,), BOS first; got shape "
                     f"{ids.shape} dtype {ids.dtype}")
  return ids.astype(np.int64)


def attribute(model, tokens, transcoders, *, max_n_logits: int = 10,
              desired_logit_prob: float = 0.95, max_feature_nodes: int | None = None,
              batch_size: int = 64, mesh=None, axis: str | None = None,
              progress: bool = True, input_string: str = "",
              metadata: dict | None = None) -> Graph:
  """The attribution graph of one prompt through ``transcoders`` (circuit-tracer's
  definitions; see ``dictlearn.attribution``).

  Args:
    model: a Gemma 3 or Gemma 2 from ``load_gemma`` (hooks are ignored), or its
      ``linearizable(model)`` when several calls share one.
    tokens: the prompt's token ids (seq,), BOS first.
    transcoders: mapping layer -> ``dictlearn.Transcoder`` (a missing layer is all error),
      or a ``dictlearn.CrossLayerTranscoder``.
    max_n_logits, desired_logit_prob: the target logits (top ones until their probability
      sums to ``desired_logit_prob``, at most ``max_n_logits``).
    max_feature_nodes: cap on feature nodes, chosen by estimated influence (None: all).
    batch_size: rows per backward pass; mesh/axis: split each batch over devices.

  Returns:
    A ``dictlearn.graphs.Graph`` (prune, score, save or export it with dictlearn.graphs).
  """
  lin = _linearized(model)
  ids = _token_ids(tokens)
  meta = {"model": lin.family, **(metadata or {})}
  return attribution.attribute(
      lin.model, lin.embeddings(ids), ids, transcoders, max_n_logits=max_n_logits,
      desired_logit_prob=desired_logit_prob, max_feature_nodes=max_feature_nodes,
      batch_size=batch_size, mesh=mesh, axis=axis, progress=progress,
      input_string=input_string, metadata=meta)


def intervene(model, transcoders, tokens, edits, *, frozen: bool = True
              ) -> attribution.Intervention:
  """Logits and latent pre-activations with latents set: ``{(layer, pos, latent): value}``.

  ``frozen=True`` holds attention patterns, norm scales, errors and every other latent at
  their clean values (the direct effects the graph's edges predict); ``frozen=False`` lets
  the edit propagate through the real model. See ``dictlearn.attribution.intervene``.
  """
  lin = _linearized(model)
  ids = _token_ids(tokens)
  return attribution.intervene(lin.model, lin.embeddings(ids), transcoders, edits,
                               frozen=frozen)


__all__ = ["FrozenRMSStandardize", "FrozenSoftmax", "Linearized", "attribute", "intervene",
           "linearizable"]
