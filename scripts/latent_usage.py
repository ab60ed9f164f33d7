"""How an SAE's latents are spent on rows of ordinary and of massive norm.

  python scripts/latent_usage.py ROWS.npy SAE_FOLDER [SAE_FOLDER ...]

``ROWS.npy``: (N, d) activations at the SAE's site (e.g. the shards of a harvest
concatenated). A row is massive when its norm is above 4x the median (the 270M's layer-9
residual has 0.02% such tokens, apostrophes at 7-10x). Prints, per SAE, one JSON line:
FVU over all rows and over the ordinary ones, the massive rows' share of the variance and
their median relative error, L0 on each kind, and how many latents never fire on an
ordinary row (``dead_on_normal``), of which ``massive_only`` fire on massive rows. Plain
numpy, no shared code with the library's encoder.
"""

import json
import sys

import numpy as np

import dictlearn as dl


def usage(sae, X, chunk=4096):
  w_enc, b_enc, thr, w_dec, b_dec = (np.asarray(getattr(sae, k), np.float32) for k in (
      "w_enc", "b_enc", "threshold", "w_dec", "b_dec"))
  norms = np.linalg.norm(X, axis=1)
  big = norms > 4 * np.median(norms)
  fired_normal = np.zeros(w_enc.shape[1], np.int64)
  fired_big = np.zeros_like(fired_normal)
  sse, l0 = np.zeros(len(X)), np.zeros(len(X))
  for i in range(0, len(X), chunk):
    x, b = X[i:i + chunk], big[i:i + chunk]
    pre = x @ w_enc + b_enc
    on = pre > thr
    sse[i:i + chunk] = np.sum((np.where(on, pre, 0) @ w_dec + b_dec - x) ** 2, axis=1)
    l0[i:i + chunk] = on.sum(1)
    fired_normal += on[~b].sum(0)
    fired_big += on[b].sum(0)
  var_all = np.sum((X - X.mean(0)) ** 2)
  var_normal = np.sum((X[~big] - X[~big].mean(0)) ** 2)
  return dict(
      rows=len(X), massive=int(big.sum()), fvu_all=float(sse.sum() / var_all),
      fvu_normal=float(sse[~big].sum() / var_normal),
      massive_var_share=float(1 - var_normal / var_all),
      massive_rel_err_median=float(np.median(np.sqrt(sse[big]) / norms[big])) if big.any() else None,
      l0_normal=float(l0[~big].mean()), l0_massive=float(l0[big].mean()) if big.any() else None,
      dead_on_normal=int(np.sum(fired_normal == 0)),
      massive_only=int(np.sum((fired_normal == 0) & (fired_big > 0))))


if __name__ == "__main__":
  rows = np.asarray(np.load(sys.argv[1], mmap_mode="r"), np.float32)
  for path in sys.argv[2:]:
    print(path, json.dumps(usage(dl.load(path), rows)), flush=True)
