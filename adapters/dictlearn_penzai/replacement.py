"""Transcoders at every layer, trained on first use and cached: what ``dictlearn circuit``
traces through when no ``--transcoders`` are given.

Attribution needs a transcoder at each MLP. Gemma Scope 2's (``transcoder_all``) are on the
hub; offline, ``default_transcoders`` harvests every layer's mlp_in and mlp_out over a
corpus in one pass of the model, fits one small affine transcoder per layer with
``dictlearn.train.fit``, and saves them under the cache folder, where later calls find
them. The settings are part of the cache key, so asking for others trains anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import dictlearn as dl
from dictlearn import cache
from dictlearn_penzai import sites as S
from dictlearn_penzai.harvesting import harvest


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the default transcoders are trained (every field is part of the cache key)."""

  tokens: int = 16_384
  seq_len: int = 128
  width: int = 512
  target_l0: float = 12.0
  steps: int = 600
  batch_size: int = 512
  learning_rate: float = 1e-3
  seed: int = 0

  def key(self, model_name: str) -> str:
    blob = json.dumps({"model": model_name, **dataclasses.asdict(self)}, sort_keys=True)
    return f"{model_name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def cache_root() -> Path:
  return cache.root() / "transcoders"


def default_transcoders(model, tokenizer, texts, *, model_name: str = "gemma-3-270m",
                        recipe: Recipe = Recipe(), cache_dir: str | os.PathLike | None = None,
                        progress: bool = True) -> dict[int, dl.Transcoder]:
  """{layer: Transcoder} for every layer of ``model``: from the cache, or trained now.

  Args:
    model, tokenizer: a penzai Gemma 3 and its tokenizer.
    texts: the corpus to harvest (read only when training).
    model_name: names the model in the cache key and the transcoders' metadata.
    recipe: the training settings.
    cache_dir: where trained sets live (default ``~/.cache/dictlearn/transcoders``, or
      ``$DICTLEARN_CACHE/transcoders``).
  """
  folder = Path(cache_dir or cache_root()) / recipe.key(model_name)
  n = S.num_layers(model)
  done = folder / "complete.json"
  if done.exists():
    return {layer: dl.load(folder / f"layer_{layer}") for layer in range(n)}
  import dictlearn.train
  from tqdm.auto import tqdm

  site_list = [s for layer in range(n) for s in (S.mlp_in(layer), S.mlp_out(layer))]
  acts = harvest(model, tokenizer, texts, site_list, seq_len=recipe.seq_len,
                 max_tokens=recipe.tokens, model_name=model_name, progress=progress)
  out = {}
  for layer in tqdm(range(n), desc="training transcoders", unit="layer", disable=not progress):
    src, dst = S.mlp_in(layer), S.mlp_out(layer)
    meta = dl.DictMeta(kind="transcoder", site=src.kind, layer=layer, site_out=dst.kind,
                       model_name=model_name, hook_point_in=src.hook_point,
                       hook_point_out=dst.hook_point, l0=recipe.target_l0)
    t, history = dl.train.fit(
        acts[src], targets=acts.pop(dst), kind="transcoder", affine=True, width=recipe.width,
        target_l0=recipe.target_l0, steps=recipe.steps, batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate, seed=recipe.seed + layer, meta=meta,
        progress=False)
    del acts[src]
    t = t.replace(meta=t.meta.replace(l0=round(float(history["l0"][-1]), 2)))
    dl.save(t, folder / f"layer_{layer}")
    out[layer] = t
  done.write_text(json.dumps({"recipe": dataclasses.asdict(recipe), "model": model_name,
                              "layers": n}) + "\n")
  return out
