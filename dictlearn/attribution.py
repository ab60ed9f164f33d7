"""Attribution graphs: direct effects between transcoder latents in a local replacement model.

The definitions are circuit-tracer 0.5's (and Anthropic's "Circuit Tracing"), so graphs can
be compared and exchanged. For one prompt, the *local replacement model* is the model with

- attention patterns (after softmax) and every RMSNorm's scale frozen at their clean values;
- each MLP (``mlp_in -> mlp_out`` of a layer) replaced by its transcoder's output plus an
  error term (the clean MLP output minus the transcoder's), so its output is the clean one;
- the gradient crossing an MLP only through the transcoder's affine skip (if any).

Given those, everything between the sources (latent decoder writes, errors, token
embeddings) and the targets (latent pre-activations, logits) is linear, and the edge
``adjacency[target, source]`` is the exact direct effect:

- a feature source ``s`` writes ``a_s * w_dec[s]`` at its position into its layer's MLP
  output (a CLT latent into every later layer's too);
- an error source writes the error vector of its (layer, position); a token source is the
  scaled embedding at its position;
- a feature target is the latent's pre-activation (not scaled by its activation); a logit
  target is the logit minus the mean logit over the vocabulary (the demeaned unembedding
  vector read at the final norm's output).

Feature activations and errors at position 0 (BOS) are set to 0: BOS carries no nodes.

The framework supplies a ``LinearizableModel``: a pure function running the blocks from
the scaled embeddings with attention patterns and norm scales frozen (``stop_gradient``,
or replayed from a recorded clean run), calling back into this module in place of each
MLP; and a function giving, from a recorded clean run, the frozen blocks as arrays
(``LinearBlocks``: norm scales, attention patterns, value and output weights). Rows of the
adjacency are computed in batches by one backward sweep through those arrays (a loop over
layers, from the highest layer a batch's targets need down to the embeddings), which
reads off each source's edge as it passes it, so no (tokens x d) gradient tensor per row
ever leaves the compiled function.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import crosslayer
from dictlearn.crosslayer import CrossLayerTranscoder
from dictlearn.dictionary import JumpReLUSAE, Transcoder, decode, jumprelu, matmul
from dictlearn.graphs import Graph

Array = jax.Array
Mlp = Callable[[int, Array, Callable[[Array], Array]], Array]


@dataclasses.dataclass(frozen=True)
class LinearizableModel:
  """What attribution needs from a framework.

  Attributes:
    params: a pytree (the model's weights), passed to ``forward`` under ``jax.jit``.
    forward: ``forward(params, x0, mlp, frozen=None, record=None) -> final``: runs every
      block from ``x0`` (n_pos, d), the scaled token embeddings, and returns the final
      norm's output (n_pos, d). In place of each MLP (with its pre- and post-norm) it
      calls ``y = mlp(layer, h, real)`` with ``h`` (n_pos, d) the ``mlp_in`` value and
      ``real(h)`` the model's own MLP output; ``y`` (n_pos, d) is used as ``mlp_out``.
      Attention patterns and norm scales carry no gradient. With ``record`` (a dict) it
      stores them there; with ``frozen`` (such a dict) it uses those values instead of
      computing them. Must be hashable (a module-level function): it is static under jit.
    linear_blocks: ``linear_blocks(params, frozen, n_pos, d) -> LinearBlocks``: the
      blocks of a clean run as arrays, ``frozen`` what ``forward`` recorded in it. Hashable
      too.
    unembedding: (vocab, d): ``logits = final @ unembedding.T``.
    n_layers: number of blocks.
    logit_soft_cap: Gemma 2's final ``cap * tanh(logits / cap)`` (None: none). Logit nodes
      and ``intervene``'s logits are the logits before it (the linear part the graph
      decomposes); the targets' probabilities are the model's, after it.
  """

  params: Any
  forward: Callable
  linear_blocks: Callable
  unembedding: Array
  n_layers: int
  logit_soft_cap: float | None = None

  @functools.cached_property
  def unembedding_mean(self) -> Array:
    """(d,) float32 mean row of ``unembedding``: read once per model, not per prompt."""
    return jnp.mean(jnp.asarray(self.unembedding, jnp.float32), axis=0)


@dataclasses.dataclass(frozen=True)
class LinearBlocks:
  """A prompt's blocks with attention patterns and norm scales frozen: linear maps.

  With ``*`` elementwise, block l maps the residual ``x`` (n_pos, d) as

      y = attn_norm[l] * x
      z[q] = sum over kv, g, k of patterns[l, kv, g, q, k] * (y[k] @ w_v[l, kv]) @ w_o[l, kv, g]
      x = x + attn_out_norm[l] * z                      (resid_mid)
      h = mlp_norm[l] * x                               (mlp_in, the transcoder's input)
      x = x + (the MLP's replacement: transcoder output, error; live only through the skip)

  and the final norm's output is ``final_norm * x``. A frozen RMSNorm is a multiplier:
  its clean 1/rms per position times its weight (Gemma's 1 + scale); a block without a
  post-attention norm has ones there. Query head ``kv * group + g`` reads kv head ``kv``.

  Attributes (float32):
    attn_norm, attn_out_norm, mlp_norm: (L, n_pos, d).
    patterns: (L, n_kv, group, n_pos, n_pos), after softmax (``[..., query, key]``).
    w_v: (L, n_kv, d, head_dim).
    w_o: (L, n_kv, group, head_dim, d).
    final_norm: (n_pos, d).
  """

  attn_norm: Array
  patterns: Array
  w_v: Array
  w_o: Array
  attn_out_norm: Array
  mlp_norm: Array
  final_norm: Array


jax.tree_util.register_dataclass(
    LinearBlocks, data_fields=["attn_norm", "patterns", "w_v", "w_o", "attn_out_norm",
                               "mlp_norm", "final_norm"], meta_fields=[])


# ------------------------------------------------------------------ transcoders


@dataclasses.dataclass(frozen=True)
class _Replacement:
  """Per-layer transcoders (None: that MLP is all error) or one cross-layer transcoder."""

  layers: tuple  # n_layers entries, Transcoder | None (per-layer)
  clt: CrossLayerTranscoder | None

  @property
  def n_layers(self) -> int:
    return self.clt.n_layers if self.clt is not None else len(self.layers)

  def encoder(self, layer):
    """(w_enc (d, width), b_enc, threshold) of a layer, or None."""
    if self.clt is not None:
      c = self.clt
      return c.w_enc[layer], c.b_enc[layer], c.threshold[layer]
    t = self.layers[layer]
    return None if t is None else (t.w_enc, t.b_enc, t.threshold)

  def skip(self, layer):
    if self.clt is not None:
      return None if self.clt.w_skip is None else self.clt.w_skip[layer]
    t = self.layers[layer]
    return None if t is None else t.w_skip

  def writes_to(self, layers: np.ndarray, target_layer: int) -> np.ndarray:
    """Which latents of ``layers`` (n,) write into ``target_layer``'s MLP output."""
    if self.clt is not None:
      return layers <= target_layer
    return (layers == target_layer) & (self.layers[target_layer] is not None)

  def reconstruct(self, mlp_in: Array, acts: list) -> Array:
    """Transcoder outputs (L, n_pos, d) from MLP inputs and (BOS-zeroed) activations."""
    if self.clt is not None:
      return crosslayer.decode(self.clt, jnp.stack(acts), mlp_in)
    outs = []
    for layer, t in enumerate(self.layers):
      if t is None:
        outs.append(jnp.zeros(mlp_in.shape[1:], jnp.float32))
        continue
      outs.append(decode(t, acts[layer], mlp_in[layer]))
    return jnp.stack(outs)


jax.tree_util.register_dataclass(_Replacement, data_fields=["layers", "clt"], meta_fields=[])


def replacement(transcoders, n_layers: int, d_model: int) -> _Replacement:
  """Checks and normalises ``transcoders``: a CrossLayerTranscoder, or a mapping layer ->
  Transcoder (a sequence indexed by layer also works; missing layers are all error)."""
  if isinstance(transcoders, CrossLayerTranscoder):
    c = transcoders.validate()
    if c.n_layers != n_layers or c.d_in != d_model or c.d_out != d_model:
      raise ValueError(
          f"the cross-layer transcoder has {c.n_layers} layers, d_in {c.d_in}, d_out "
          f"{c.d_out}; the model has {n_layers} layers of d_model {d_model}")
    return _Replacement(layers=(), clt=c)
  if isinstance(transcoders, Mapping):
    items = dict(transcoders)
  elif isinstance(transcoders, (list, tuple)):
    items = {i: t for i, t in enumerate(transcoders) if t is not None}
  else:
    raise TypeError("transcoders must be a CrossLayerTranscoder or a mapping layer -> "
                    f"Transcoder, not {type(transcoders).__name__}")
  if not items:
    raise ValueError("no transcoders given: attribution needs at least one layer's")
  layers = [None] * n_layers
  for layer, t in items.items():
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layers:
      raise ValueError(f"transcoder key {layer!r} is not a layer index in [0, {n_layers})")
    if isinstance(t, JumpReLUSAE) or not isinstance(t, Transcoder):
      raise TypeError(f"layer {layer}: attribution needs transcoders (mlp_in -> mlp_out), "
                      f"not {type(t).__name__}")
    t.validate()
    if t.d_in != d_model or t.d_out != d_model:
      raise ValueError(f"layer {layer}: the transcoder maps {t.d_in} -> {t.d_out} but the "
                       f"model's MLP maps {d_model} -> {d_model}")
    if t.meta.layer is not None and t.meta.layer != layer:
      raise ValueError(f"the transcoder given for layer {layer} was made for layer "
                       f"{t.meta.layer} (its metadata); key it by its own layer")
    layers[int(layer)] = t
  return _Replacement(layers=tuple(layers), clt=None)


# ------------------------------------------------------------------ the clean run


@functools.partial(jax.jit, static_argnames=("forward", "record"))
def _clean(params, x0, *, forward, record=False):
  ins, outs = [], []

  def mlp(layer, h, real):
    y = real(h)
    ins.append(h)
    outs.append(y)
    return y

  frozen = {} if record else None  # filled by the frozen layers: patterns, norm scales
  final = forward(params, x0, mlp, record=frozen)
  return jnp.stack(ins), jnp.stack(outs), final, frozen


@dataclasses.dataclass(frozen=True)
class Clean:
  """One prompt's clean run: mlp_in, mlp_out (L, n_pos, d), final norm output (n_pos, d)."""

  mlp_in: Array
  mlp_out: Array
  final: Array


jax.tree_util.register_dataclass(Clean, data_fields=["mlp_in", "mlp_out", "final"],
                                 meta_fields=[])


def clean_run(model: LinearizableModel, x0: Array) -> Clean:
  return Clean(*_clean(model.params, x0, forward=model.forward)[:3])


def activations(rep: _Replacement, mlp_in: Array) -> tuple[list, list]:
  """(pre-activations, activations) per layer, (n_pos, width) or None; BOS set to 0."""
  pres, acts = [], []
  for layer in range(rep.n_layers):
    enc = rep.encoder(layer)
    if enc is None:
      pres.append(None)
      acts.append(None)
      continue
    w_enc, b_enc, threshold = enc
    pre = matmul(mlp_in[layer], w_enc) + b_enc.astype(jnp.float32)
    pres.append(pre)
    acts.append(jumprelu(pre, threshold).at[0].set(0.0))
  return pres, acts


# ------------------------------------------------------------------ the linear model


@functools.partial(jax.jit, static_argnames=("forward", "linear_blocks"))
def _clean_blocks(params, x0, rep, unembedding, last, *, forward, linear_blocks):
  """What attribution reads from the clean run of ``x0`` (n, d), whose positions after
  ``last`` are padding: its frozen blocks (``LinearBlocks``), each layer's activations
  (BOS and padding zeroed), the errors (L, n, d) (mlp_out minus the transcoder's output;
  zero at BOS and padding) and the logits at ``last`` (vocab,)."""
  mlp_in, mlp_out, final, frozen = _clean(params, x0, forward=forward, record=True)
  blocks = linear_blocks(params, frozen, *x0.shape)
  blocks = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), blocks)
  pos = jnp.arange(x0.shape[0])[:, None]
  acts = [None if a is None else a * (pos <= last) for a in activations(rep, mlp_in)[1]]
  err = (mlp_out - rep.reconstruct(mlp_in, acts)) * ((pos > 0) & (pos <= last))
  return blocks, acts, err, matmul(jnp.asarray(unembedding, jnp.float32), final[last])


@functools.partial(jax.jit, static_argnames=("n_pos_run",))
def _rows(blocks: LinearBlocks, consts, target_ids, live, *, n_pos_run):
  """Rows (B, n_slots + L * n_pos + n_pos) of the targets ``target_ids`` (B,), in slots:
  target slot ``i < n_slots`` is a feature's pre-activation (``consts["enc_*"]``, padding
  included), ``n_slots + j`` is logit j; source columns are feature slots (``dec_src``),
  then errors (layer, position), then tokens.

  One backward sweep: ``g`` is each target's gradient with respect to the residual, from
  the highest layer a target of the batch reads (a logit: past the last) down to the
  embeddings. At each layer the edges of that layer's sources (decoder writes and errors,
  added to the residual there) are ``g`` dotted with them; the layer's feature targets
  enter at its mlp_in. The model is causal, so a row's gradient lives only at its target's
  position and before: ``g`` (M, d) holds just those (row, position) pairs, listed by
  ``live`` (``_packed``), and only the patterns' mixing of positions runs in a (B, n)
  layout. Only the first ``n = n_pos_run`` positions run: enough for targets before n.
  """
  n = n_pos_run
  n_layers, n_pos = consts["err"].shape[:2]
  n_slots = consts["enc_vec"].shape[0]
  b = target_ids.shape[0]
  row_of, pos_of, start = live["row"], live["pos"], live["start"]
  is_logit = target_ids >= n_slots
  feat = jnp.minimum(target_ids, n_slots - 1)
  logit = jnp.clip(target_ids - n_slots, 0, consts["logit_vecs"].shape[0] - 1)
  t_layer = jnp.where(is_logit, n_layers, consts["enc_layer"][feat])
  t_pos = jnp.where(is_logit, consts["last"], consts["enc_pos"][feat])
  t_slot = start + t_pos  # Past the slots for padding rows: dropped.
  t_vec = jnp.where(is_logit[:, None], 0.0, consts["enc_vec"][feat])
  # Logits read the final norm's output at the last position.
  lvec = jnp.where(is_logit[:, None], consts["logit_vecs"][logit], 0.0)
  g = jnp.zeros((row_of.shape[0], consts["x0"].shape[-1])).at[t_slot].set(
      lvec * blocks.final_norm[t_pos], mode="drop")
  err, x0 = consts["err"][:, :n], consts["x0"][:n]
  top = jnp.max(jnp.minimum(t_layer, n_layers - 1))
  per_slot = lambda a: a[pos_of]  # noqa: E731  (n, ...) per position -> (M, ...)
  to_grid = lambda y: jnp.zeros((b, n, *y.shape[1:])).at[row_of, pos_of].set(  # noqa: E731
      y, mode="drop")
  # The products' weights with the contracted axis last, as the skip's (no per-layer
  # transposes in the loop; free reshapes when there is one kv head).
  n_kv, group, head_dim = blocks.w_o.shape[1:4]
  w_o = blocks.w_o.reshape(n_layers, -1, blocks.w_o.shape[-1])  # (L, kv*g*h, d)
  w_v = jnp.swapaxes(blocks.w_v, 1, 2).reshape(n_layers, -1, n_kv * head_dim)  # (L, d, kv*h)
  patterns = blocks.patterns[:, :, :, :n, :n]

  def layer(i, carry):
    g, gc, ge = carry
    l = top - i
    # Sources added to the residual at this layer's mlp_out: decoder writes, errors.
    dpos = consts["dec_pos"][l]
    by_slot = jnp.einsum("md,jd->mj", g, consts["dec_vec"][l])  # Every slot, every source:
    edges = by_slot.at[start[:, None] + dpos, jnp.arange(dpos.shape[0])].get(  # a small
        mode="fill", fill_value=0.0)  # product, then each row's slot at each source.
    seen = dpos[None, :] <= t_pos[:, None]  # Later positions are not the row's slots.
    gc = gc.at[:, consts["dec_src"][l]].add(edges * seen)
    ge = ge.at[row_of, l, pos_of].set(jnp.sum(g * per_slot(err[l]), -1), mode="drop")
    # The MLP passes a gradient only through the skip; this layer's targets enter here.
    gh = jnp.einsum("mo,io->mi", g, consts["skip"][l])
    gh = gh.at[t_slot].add(jnp.where((t_layer == l)[:, None], t_vec, 0.0), mode="drop")
    g = g + per_slot(blocks.mlp_norm[l, :n]) * gh
    # Attention's value path, patterns frozen.
    go = jnp.einsum("md,jd->mj", per_slot(blocks.attn_out_norm[l, :n]) * g, w_o[l])
    # Positions mix in a (kv, query, g, row, h) grid: the contraction over (query, g)
    # is one matrix product per kv head, with no transposes of the grid.
    grid = jnp.zeros((n_kv, n, group, b, head_dim)).at[:, pos_of, :, row_of].set(
        go.reshape(-1, n_kv, group, head_dim), mode="drop")
    gv = jnp.einsum("kgqs,kqgbh->sbkh", patterns[l], grid)
    gv = gv.at[pos_of, row_of].get(mode="fill", fill_value=0.0)  # (M, kv, h)
    gy = jnp.einsum("mj,dj->md", gv.reshape(-1, n_kv * head_dim), w_v[l])
    return g + per_slot(blocks.attn_norm[l, :n]) * gy, gc, ge

  init = (g, jnp.zeros((b, n_slots)), jnp.zeros((b, n_layers, n)))
  g, gc, ge = jax.lax.fori_loop(0, top + 1, layer, init)
  gt = to_grid(jnp.sum(g * per_slot(x0), -1))  # x = x0 * (1 + t): the token sources.
  ge = jnp.zeros((b, n_layers, n_pos)).at[:, :, :n].set(ge)
  gt = jnp.zeros((b, n_pos)).at[:, :n].set(gt)
  return jnp.concatenate([gc, ge.reshape(b, -1), gt], axis=1)


def _packed(order: np.ndarray, need: np.ndarray, batch: int, n: int):
  """Batches of the rows ``order`` (in that order) as (rows, live): at most ``batch`` rows
  a batch, whose positions (``need[row]`` each: the target's and those before) fill at
  most ``max(n, batch * n // 2)`` slots. ``live``: each slot's ``row`` and ``pos`` (M,)
  (pads: row ``batch``) and each row's first slot ``start`` (B,) (pads: M)."""
  slots = max(n, batch * n // 2)
  i = 0
  while i < len(order):
    cost = np.cumsum(need[order[i:i + batch]])
    k = int(np.searchsorted(cost, slots, side="right"))
    at, used = order[i:i + k], int(cost[k - 1])
    live = dict(row=np.full(slots, batch, np.int32), pos=np.zeros(slots, np.int32),
                start=np.full(batch, slots, np.int32))
    live["row"][:used] = np.repeat(np.arange(k), need[at])
    live["pos"][:used] = np.arange(used) - np.repeat(cost[:k] - need[at], need[at])
    live["start"][:k] = cost[:k] - need[at]
    yield at, live
    i += k


# Every prompt up to this many tokens runs its clean run at this length: one compiled clean
# run serves them all, while their rows run at the prompt's ``bucket`` length.
SHORT_PROMPT = 32


def bucket(n: int, least: int = 8) -> int:
  """``n`` rounded up to 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (four sizes an octave):
  the padded sizes that let prompts of similar length share compiled functions, for at
  most a quarter more work."""
  n = int(n)
  if n <= least:
    return least
  step = 1 << max(0, n.bit_length() - 3)
  return -(-n // step) * step


def row_prefixes(n_pos: int, long_from: int = 256) -> tuple[int, ...]:
  """Prefix lengths to run rows on: for long prompts, where the rows' compute outweighs
  compiling a few more shapes, 4 prefixes (a row runs the shortest holding its target);
  else the whole."""
  if n_pos < long_from:
    return (n_pos,)
  return tuple(sorted({min(n_pos, -(-n_pos * k // 4 // 8) * 8) for k in (1, 2, 3, 4)}))


def _constants(rep: _Replacement, x0, err, feats, logit_vecs, *, n_real: int,
               pad: bool) -> tuple[dict, np.ndarray]:
  """The arrays the sweep reads, and each feature's slot (n_active,).

  Each layer's feature list is padded to one length (the longest, ``bucket``-ed with
  ``pad``), for targets (``enc_*``) and for sources (``dec_*``: a CLT's writes into a
  layer, which grow with the layer); the logit vectors to a bucketed count with ``pad``.
  Pads are zero vectors, so they add nothing.
  """
  layer_of, pos_of, lat_of, val_of = feats
  n_layers = rep.n_layers
  size = bucket if pad else int
  counts = np.bincount(layer_of, minlength=n_layers)
  n_enc = size(max(1, counts.max(initial=0)))  # (one pad slot when nothing fires)
  first = np.concatenate([[0], np.cumsum(counts)[:-1]])
  at = np.arange(len(layer_of)) - first[layer_of]  # Each feature's index in its layer.
  slot = layer_of * n_enc + at
  enc = {k: np.zeros((n_layers, n_enc), np.int32) for k in ("pos", "lat")}
  enc["pos"][layer_of, at], enc["lat"][layer_of, at] = pos_of, lat_of
  enc_keep = np.zeros((n_layers, n_enc), np.float32)
  enc_keep[layer_of, at] = 1.0
  writes = [np.flatnonzero(rep.writes_to(layer_of, layer)) for layer in range(n_layers)]
  n_dec = size(max(1, max((len(w) for w in writes), default=0)))
  dec = {k: np.zeros((n_layers, n_dec), np.int32) for k in ("pos", "src", "layer", "lat")}
  dec_val = np.zeros((n_layers, n_dec), np.float32)
  for layer, src in enumerate(writes):
    for k, v in (("pos", pos_of), ("src", slot), ("layer", layer_of), ("lat", lat_of)):
      dec[k][layer, :len(src)] = v[src]
    dec_val[layer, :len(src)] = val_of[src]
  enc_vec, dec_vec, skip = [], [], []
  d = x0.shape[-1]
  for layer in range(n_layers):  # Per layer: equal shapes share one compilation.
    e = rep.encoder(layer)
    enc_vec.append(jnp.zeros((n_enc, d)) if e is None else
                   _encoder_rows(e[0], enc["lat"][layer], enc_keep[layer]))
    if rep.clt is not None:
      rows = _clt_rows(rep.clt.w_dec, dec["layer"][layer], dec["lat"][layer], dec_val[layer],
                       np.int32(layer))
    elif rep.layers[layer] is not None:
      rows = _plt_rows(rep.layers[layer].w_dec, dec["lat"][layer], dec_val[layer])
    else:
      rows = jnp.zeros((n_dec, d))
    dec_vec.append(rows)
    w_skip = rep.skip(layer)
    skip.append(jnp.zeros((d, d)) if w_skip is None else jnp.asarray(w_skip, jnp.float32))
  logits = np.zeros((size(len(logit_vecs)), d), np.float32)
  logits[:len(logit_vecs)] = logit_vecs
  consts = dict(
      x0=x0, err=err, skip=jnp.stack(skip), enc_vec=jnp.concatenate(enc_vec),
      enc_pos=enc["pos"].reshape(-1), enc_layer=np.repeat(np.arange(n_layers, dtype=np.int32),
                                                          n_enc),
      dec_vec=jnp.stack(dec_vec), dec_pos=dec["pos"], dec_src=dec["src"], logit_vecs=logits,
      last=np.int32(n_real - 1))
  return consts, slot


@jax.jit
def _encoder_rows(w_enc, latents, keep):
  """(n, d) float32 encoder vectors of ``latents`` (n,), zero where not ``keep``."""
  return jnp.take(w_enc.astype(jnp.float32), latents, axis=1).T * keep[:, None]


@jax.jit
def _plt_rows(w_dec, latents, scale):
  """(n, d) float32 decoder rows of ``latents`` (n,) times ``scale`` (n,)."""
  return w_dec[latents].astype(jnp.float32) * scale[:, None]


@jax.jit
def _clt_rows(w_dec, layers, latents, scale, target_layer):
  """(n, d) float32 decoder rows of a CLT's ``latents`` of ``layers`` (n,) into
  ``target_layer``, times ``scale`` (n,)."""
  return w_dec[layers, latents, target_layer].astype(jnp.float32) * scale[:, None]


# ------------------------------------------------------------------ graphs


def salient_logits(logits: Array, unembedding: Array, *, max_n_logits: int,
                   desired_logit_prob: float, soft_cap: float | None = None,
                   unembedding_mean: Array | None = None):
  """(token ids, probabilities, demeaned unembedding vectors (n, d)) of the target logits:
  the most probable next tokens until their cumulative probability reaches
  ``desired_logit_prob`` (that one included), at most ``max_n_logits``. ``logits`` (vocab,)
  come before the soft-cap ``soft_cap`` (if any), which the probabilities then apply.
  ``unembedding_mean``: the mean row of ``unembedding``, if already computed."""
  probs = np.asarray(_probabilities(logits, soft_cap))
  order = np.argsort(-probs, kind="stable")[:max_n_logits]
  top = probs[order]
  cutoff = int(np.searchsorted(np.cumsum(top), desired_logit_prob)) + 1
  order, top = order[:cutoff], top[:cutoff]
  if unembedding_mean is None:
    unembedding_mean = jnp.mean(jnp.asarray(unembedding, jnp.float32), axis=0)
  vecs = _demeaned(unembedding, order.astype(np.int32), unembedding_mean)
  return order.astype(np.int64), top.astype(np.float32), vecs


@functools.partial(jax.jit, static_argnames=("soft_cap",))
def _probabilities(logits, soft_cap):
  logits = jnp.asarray(logits, jnp.float32)
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  return jax.nn.softmax(logits)


@jax.jit
def _demeaned(unembedding, ids, mean):
  return unembedding[ids].astype(jnp.float32) - mean


def _active(acts) -> tuple[np.ndarray, ...]:
  """(layer, position, latent, value) of every nonzero activation, sorted in that order."""
  parts = []
  for layer, a in enumerate(acts):
    if a is None:
      continue
    a = np.asarray(a)
    pos, lat = np.nonzero(a)
    parts.append((np.full(len(pos), layer), pos, lat, a[pos, lat]))
  if not parts:
    z = np.zeros((0,), np.int64)
    return z, z, z, np.zeros((0,), np.float32)
  return tuple(np.concatenate(p) for p in zip(*parts))


def _partial_influence(rows: np.ndarray, row_nodes: np.ndarray, logit_probs: np.ndarray,
                       n_nodes: int, max_iter: int = 128) -> np.ndarray:
  """Influence on the logits of every node (n_nodes,) through the rows computed so far.

  rows (r, n_sources) with n_sources + n_logits = n_nodes; row_nodes (r,) the node each row
  is the target of. Influence = w (B + B^2 + ...), B the |rows| normalised to sum 1.
  """
  a = np.abs(rows)
  a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-10)
  prod = np.zeros(n_nodes, np.float64)
  prod[n_nodes - len(logit_probs):] = logit_probs
  influence = np.zeros(a.shape[1], np.float64)
  for _ in range(max_iter):
    prod_rows = prod[row_nodes]
    nxt = prod_rows @ a
    if not nxt.any():
      break
    influence += nxt
    prod = np.zeros(n_nodes, np.float64)
    prod[:a.shape[1]] = nxt
  return influence


def attribute(model: LinearizableModel, x0: Array, tokens, transcoders, *,
              max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              max_feature_nodes: int | None = None, batch_size: int = 64,
              update_interval: int = 4, mesh=None, axis: str | None = None,
              split_rows_from: int = 256, pad_shapes: bool = True, progress: bool = True,
              metadata: dict | None = None, input_string: str = "") -> Graph:
  """The attribution graph of one prompt (see the module docstring for its definitions).

  Args:
    model: the framework's ``LinearizableModel``.
    x0: (n_pos, d) the scaled token embeddings of the prompt (BOS first).
    tokens: (n_pos,) the prompt's token ids.
    transcoders: a ``CrossLayerTranscoder``, or a mapping layer -> ``Transcoder``
      (affine or not; a layer without one is all error).
    max_n_logits, desired_logit_prob: which logits are targets (``salient_logits``).
    max_feature_nodes: at most this many feature nodes; their rows are computed in order
      of estimated influence on the logits (re-estimated every ``update_interval``
      batches). None: every active feature.
    batch_size: rows per compiled backward pass, at most; a batch also holds at most
      ``batch_size * n_pos / 2`` (row, position) pairs, a row one per position up to its
      target's.
    mesh: a ``jax.sharding.Mesh`` (``jax.make_mesh`` or ``Mesh``): each batch of rows is
      split over ``mesh[axis]`` (default: its first axis); weights are replicated.
    split_rows_from: from this many tokens on, a row runs only the prefix its target
      needs (4 prefix lengths, each compiled once). Every batch of rows runs only the
      blocks below its highest target (rows are batched by layer).
    pad_shapes: run the prompt padded to a ``bucket`` length (its clean run to at least
      ``SHORT_PROMPT``) and each layer's feature list to a bucketed size (pads change no
      edge), so that prompts of similar size reuse the compiled functions (and, with JAX's
      persistent compilation cache, later processes do too); False compiles for the exact
      sizes.
    progress: a tqdm bar over the rows.

  Returns:
    A ``dictlearn.graphs.Graph``.
  """
  tokens = np.asarray(tokens, np.int64).reshape(-1)
  x0 = jnp.asarray(x0, jnp.float32)
  n_pos, d = x0.shape
  if tokens.shape[0] != n_pos:
    raise ValueError(f"tokens has {tokens.shape[0]} positions but x0 has {n_pos}")
  rep = replacement(transcoders, model.n_layers, d)
  # The model is causal: positions appended after the prompt change nothing before them.
  n_run = bucket(n_pos) if pad_shapes else n_pos  # The rows' length,
  n_clean = max(n_run, SHORT_PROMPT) if pad_shapes else n_pos  # and the clean run's.
  padded_x0 = np.zeros((n_clean, d), np.float32)  # (host arrays: eager ops compile per shape)
  padded_x0[:n_pos] = np.asarray(x0)
  x0 = jnp.asarray(padded_x0)
  blocks, acts, err, logits = _clean_blocks(
      model.params, x0, rep, model.unembedding, np.int32(n_pos - 1), forward=model.forward,
      linear_blocks=model.linear_blocks)
  feats = _active(acts)
  n_active = len(feats[0])
  logit_ids, logit_p, logit_vecs = salient_logits(
      logits, model.unembedding, max_n_logits=max_n_logits,
      desired_logit_prob=desired_logit_prob, soft_cap=model.logit_soft_cap,
      unembedding_mean=model.unembedding_mean)
  n_logits = len(logit_ids)
  consts, slot = _constants(rep, x0, err, feats, logit_vecs, n_real=n_pos, pad=pad_shapes)
  n_slots = consts["enc_vec"].shape[0]
  target_slot = np.concatenate([slot, n_slots + np.arange(n_logits)]).astype(np.int32)
  # Columns of a computed row that are real sources: feature slots, then the errors and
  # tokens of the prompt's positions.
  real = np.arange(n_pos)
  source_cols = np.concatenate([
      slot, n_slots + (np.arange(model.n_layers)[:, None] * n_clean + real).ravel(),
      n_slots + model.n_layers * n_clean + real])
  n_sources = n_active + model.n_layers * n_pos + n_pos
  n_nodes = n_sources + n_logits

  n_dev = 1
  placed = None
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dictlearn.sharding import auto_axes
    mesh = auto_axes(mesh)
    axis = axis or mesh.axis_names[0]
    n_dev = mesh.shape[axis]
    rep_s = NamedSharding(mesh, P())
    blocks, consts = jax.device_put((blocks, consts), rep_s)
    placed = NamedSharding(mesh, P(axis))
  batch = max(n_dev, -(-batch_size // n_dev) * n_dev)

  prefixes = row_prefixes(n_run, split_rows_from)
  # What each target needs run: its position's prefix and the blocks up to its layer.
  need_pos = np.concatenate([feats[1] + 1, np.full(n_logits, n_pos)])
  need_layer = np.concatenate([feats[0], np.full(n_logits, model.n_layers)])

  def compute(target_ids: np.ndarray, out: np.ndarray, dest: np.ndarray | None = None):
    """Writes the rows of ``target_ids`` into ``out[dest]`` (default: ``out`` in order)."""
    dest = np.arange(len(target_ids)) if dest is None else dest
    p = np.asarray(prefixes)[np.searchsorted(prefixes, need_pos[target_ids])]
    for n_pos_run in sorted(set(p.tolist())):
      where = np.flatnonzero(p == n_pos_run)  # Highest layers first: a batch runs its
      where = where[np.argsort(-need_layer[target_ids[where]], kind="stable")]  # top down.
      for at, live in _packed(where, need_pos[target_ids], batch, n_pos_run):
        ids = target_slot[target_ids[at]]
        padded = np.concatenate([ids, np.full(batch - len(ids), ids[-1])]).astype(np.int32)
        ids_dev = jax.device_put(padded, placed) if placed is not None else padded
        rows = _rows(blocks, consts, ids_dev, live, n_pos_run=n_pos_run)
        out[dest[at]] = np.asarray(rows)[:len(ids)][:, source_cols]
        bar.update(len(ids))

  capped = max_feature_nodes is not None and max_feature_nodes < n_active
  n_select = min(max_feature_nodes, n_active) if capped else n_active
  from tqdm.auto import tqdm
  bar = tqdm(total=n_logits + n_select, desc="attribution rows", disable=not progress,
             unit="row")
  try:
    if not capped:  # Every feature: rows go straight to their place in the graph.
      adjacency = np.zeros((n_nodes, n_nodes), np.float32)
      compute(np.arange(n_active + n_logits), adjacency[:, :n_sources],
              np.concatenate([np.arange(n_active), n_sources + np.arange(n_logits)]))
      selected = np.arange(n_active)
    else:  # Rows in order of estimated influence, logits first.
      edges = np.zeros((n_logits + n_select, n_sources), np.float32)
      compute(n_active + np.arange(n_logits), edges[:n_logits])
      row_nodes = np.concatenate([n_sources + np.arange(n_logits),
                                  np.zeros(n_select, np.int64)])
      visited = np.zeros(n_active, bool)
      done = 0
      while done < n_select:
        influence = _partial_influence(edges[:n_logits + done], row_nodes[:n_logits + done],
                                       logit_p, n_nodes)[:n_active]
        rank = np.argsort(-influence, kind="stable")
        queue = update_interval * batch * len(prefixes)
        pending = rank[~visited[rank]][:min(queue, n_select - done)]
        at = n_logits + done
        compute(pending, edges[at:at + len(pending)])
        row_nodes[at:at + len(pending)] = pending
        visited[pending] = True
        done += len(pending)
      selected = np.flatnonzero(visited)
      cols = np.concatenate([selected, np.arange(n_active, n_sources)])
      size = len(selected) + (n_sources - n_active) + n_logits
      adjacency = np.zeros((size, size), np.float32)
      order = n_logits + np.argsort(row_nodes[n_logits:], kind="stable")
      for i in range(0, len(order), 1024):  # Row blocks: no second copy of the edges.
        block = order[i:i + 1024]
        adjacency[i:i + len(block), :len(cols)] = edges[block][:, cols]
      adjacency[size - n_logits:, :len(cols)] = edges[:n_logits][:, cols]
      del edges
  finally:
    bar.close()
  features = np.stack([feats[0], feats[1], feats[2]], axis=1).astype(np.int64)
  return Graph(
      input_tokens=tokens, active_features=features,
      activation_values=np.asarray(feats[3], np.float32), selected_features=selected,
      logit_tokens=logit_ids, logit_probabilities=logit_p, adjacency=adjacency,
      n_layers=model.n_layers, input_string=input_string, metadata=dict(metadata or {}))


# ------------------------------------------------------------------ interventions


@dataclasses.dataclass(frozen=True)
class Intervention:
  """What ``intervene`` returns.

  Attributes:
    logits: (n_pos, vocab) after the edit (before a Gemma 2 soft-cap: see
      ``LinearizableModel.logit_soft_cap``).
    pre_activations: per layer, (n_pos, width) of every latent (None where a layer has no
      transcoder), after the edit.
    clean_logits, clean_pre_activations: the same without it.
  """

  logits: np.ndarray
  pre_activations: list
  clean_logits: np.ndarray
  clean_pre_activations: list


@functools.partial(jax.jit, static_argnames=("forward", "frozen_mode"))
def _edited(params, x0, consts, edits, *, forward, frozen_mode):
  """Logits and pre-activations with the latents ``edits["layer", "pos", "latent"]`` (E,)
  set to ``edits["value"]``; see ``intervene``."""
  rep, clean = consts["rep"], consts["clean"]
  e_layer, e_pos, e_lat = edits["layer"], edits["pos"], edits["latent"]
  # The activation each edit replaces: clean (frozen), or live, filled in at its layer.
  replaced = edits["clean_value"]
  pres = []

  def mlp(layer, h, real):
    nonlocal replaced
    enc = rep.encoder(layer)
    pre = None
    if enc is not None:
      pre = matmul(h, enc[0]) + enc[1].astype(jnp.float32)
      if not frozen_mode:
        live = jumprelu(pre, enc[2])[e_pos, jnp.minimum(e_lat, pre.shape[-1] - 1)]
        replaced = jnp.where(e_layer == layer, live, replaced)
    pres.append(pre)
    if frozen_mode:
      y = clean.mlp_out[layer]
      w_skip = rep.skip(layer)
      if w_skip is not None:  # The skip is the replacement model's live linear path.
        y = y + matmul(h, w_skip) - matmul(clean.mlp_in[layer], w_skip)
    else:
      y = real(h)
    # What each edited latent writes here: (value - replaced) x its decoder row.
    if rep.clt is not None:
      rows = rep.clt.w_dec[e_layer, e_lat, layer].astype(jnp.float32)
      writes = e_layer <= layer
    elif rep.layers[layer] is not None:
      w_dec = rep.layers[layer].w_dec
      rows = w_dec[jnp.minimum(e_lat, w_dec.shape[0] - 1)].astype(jnp.float32)
      writes = e_layer == layer
    else:
      return y
    delta = jnp.where(writes, edits["value"] - replaced, 0.0)[:, None] * rows
    return y.at[e_pos].add(delta)

  final = forward(params, x0, mlp, frozen=consts.get("frozen") if frozen_mode else None)
  return matmul(final, consts["unembedding"].T), pres


def intervene(model: LinearizableModel, x0: Array, transcoders,
              edits: Mapping[tuple[int, int, int], float], *, frozen: bool = True
              ) -> Intervention:
  """Runs the prompt with latents set to given values: ``{(layer, position, latent): value}``.

  ``frozen=True``: the local replacement model of the clean run. Attention patterns, norm
  scales, errors and every other latent's contribution stay at their clean values, and the
  edit reaches later layers only through the residual stream, attention's value path and
  the transcoders' skips: the change in each pre-activation (and demeaned logit) is what
  the graph's edges predict (edge weight x change in the source's activation).
  ``frozen=False``: the edit propagates through the real model (real MLPs, attention and
  norms recomputed), keeping each edited MLP's reconstruction error.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  n_pos, d = x0.shape
  rep = replacement(transcoders, model.n_layers, d)
  *clean, recorded = _clean(model.params, x0, forward=model.forward, record=bool(frozen))
  clean = Clean(*clean)
  pres, acts = activations(rep, clean.mlp_in)
  keys = []
  for key in edits:
    layer, pos, lat = (int(v) for v in key)
    if not 0 <= layer < rep.n_layers or rep.encoder(layer) is None:
      raise ValueError(f"edit {key}: layer {layer} has no transcoder")
    width = rep.encoder(layer)[0].shape[-1]
    if not 0 <= pos < n_pos or not 0 <= lat < width:
      raise ValueError(f"edit {key}: position must be in [0, {n_pos}) and latent in "
                       f"[0, {width})")
    keys.append((layer, pos, lat))
  cols = np.asarray(keys, np.int32).reshape(-1, 3)
  arrays = dict(layer=cols[:, 0], pos=cols[:, 1], latent=cols[:, 2],
                value=np.asarray([float(edits[k]) for k in edits], np.float32),
                clean_value=np.asarray([acts[l][p, k] for l, p, k in keys], np.float32))
  consts = dict(rep=rep, clean=clean, unembedding=jnp.asarray(model.unembedding))
  if frozen:
    consts["frozen"] = recorded
  logits, new_pres = _edited(model.params, x0, consts, arrays, forward=model.forward,
                             frozen_mode=frozen)
  as_np = lambda ps: [None if p is None else np.asarray(p) for p in ps]
  clean_logits = matmul(clean.final, jnp.asarray(model.unembedding).T)
  return Intervention(logits=np.asarray(logits), pre_activations=as_np(new_pres),
                      clean_logits=np.asarray(clean_logits), clean_pre_activations=as_np(pres))
