"""The run's history (one row per logged step) and the metadata given to the result."""

from __future__ import annotations

import json

import jax
import numpy as np

from dictlearn.activation_data import ShardFolder
from dictlearn.dictionary import DictMeta
from dictlearn.train.config import TrainConfig
from dictlearn.train.init import METRICS

HISTORY_KEYS = ("step", "loss", "mse", "l0", "fvu", "dead_fraction", "penalty",
                "learning_rate", "sparsity_coeff")


def empty() -> dict:
  return {k: [] for k in HISTORY_KEYS}


def log_row(state, done: int, cfg: TrainConfig, opt) -> dict:
  """The history row of the window ending at step ``done`` (``opt``: the run's
  :class:`~dictlearn.train.step.Optimizer`, for its schedules)."""
  acc = jax.device_get(state["acc"])
  n = max(float(acc["n"]), 1.0)
  since = np.asarray(jax.device_get(state["since_fired"]))
  row = {k: float(acc[k]) / n for k in METRICS}
  row["fvu"] = float(acc["sse"]) / max(float(acc["var"]), 1e-30)
  row["step"] = done
  row["dead_fraction"] = float(np.mean(since >= cfg.dead_window_tokens))
  row["learning_rate"] = float(opt.lr_at(done - 1))
  row["sparsity_coeff"] = float(opt.coeff_at(float(done - 1)))
  return row


def as_arrays(history: dict) -> dict:
  return {k: np.asarray(v, np.int64 if k == "step" else np.float32)
          for k, v in history.items()}


def meta_for(meta: DictMeta | None, src, cfg: TrainConfig) -> DictMeta:
  """``meta`` (or the one a shard folder source records) with the run's kind."""
  if meta is None:
    folder = getattr(src, "x", None)
    if isinstance(folder, ShardFolder):
      m = folder.meta
      meta = DictMeta(site=m.get("site"), layer=m.get("layer"),
                      model_name=m.get("model_name"), hook_point_in=m.get("hook_point"))
      out = getattr(src, "y", None)
      if cfg.kind == "transcoder" and isinstance(out, ShardFolder):
        meta = meta.replace(site_out=out.meta.get("site"),
                            hook_point_out=out.meta.get("hook_point"))
    else:
      meta = DictMeta()
  return meta.replace(kind=cfg.kind)


def final_meta(meta: DictMeta, cfg: TrainConfig, history: dict, scales) -> DictMeta:
  """``meta`` with the L0 (the target, else the last logged) and the training record."""
  l0 = cfg.target_l0
  if l0 is None and history["l0"]:
    l0 = round(float(history["l0"][-1]), 2)
  training = {"trainer": "dictlearn.train.fit", "steps": cfg.steps,
              "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
              "seed": cfg.seed, "target_l0": cfg.target_l0,
              "sparsity_coeff": cfg.sparsity_coeff, "matryoshka": list(cfg.matryoshka),
              "normalisation_scales": list(scales)}
  extra = dict(meta.extra)
  extra["training"] = json.dumps(training)
  return meta.replace(l0=l0, extra=tuple(sorted(extra.items())))
