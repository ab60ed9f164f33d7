"""dictlearn.catalog's Gemma Scope 1 references and Gemma 2 sizes (no network)."""

import numpy as np
import pytest

import dictlearn as dl
from dictlearn import catalog


def test_gemma_scope_1_references():
  assert catalog.gs1_ref("2b", "res", 20, "16k", 71) == (
      "google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
  assert "google/gemma-scope-27b-pt-res" in catalog.gs1_releases()
  assert len(catalog.gs1_releases()) == 7
  with pytest.raises(ValueError, match="out of range: Gemma 2 2b has 26 layers"):
    catalog.gs1_ref("2b", "res", 26, "16k", 71)
  with pytest.raises(ValueError, match="width '17k'"):
    catalog.gs1_ref("9b", "mlp", 3, "17k", 50)
  with pytest.raises(ValueError, match="site family"):
    catalog.gs1_repo_id("27b", "att")


def test_gemma2_sizes():
  sizes = {k: (m.num_layers, m.d_model) for k, m in catalog.GEMMA2_MODELS.items()}
  assert sizes == {"2b": (26, 2304), "9b": (42, 3584), "27b": (46, 4608)}
  assert catalog.GEMMA2_MODELS["27b"].query_pre_attn_scalar == 144


@pytest.mark.parametrize("family", sorted(catalog.GS1_SITES))
def test_local_folder_named_like_a_release_reads_its_site(tmp_path, family):
  """A downloaded folder keeps the repository's name; the loader reads the site from it."""
  folder = tmp_path / f"gemma-scope-2b-pt-{family}" / "layer_5" / "width_16k" / "average_l0_9"
  folder.mkdir(parents=True)
  d, w = 8, 4
  np.savez(folder / "params.npz", W_enc=np.zeros((d, w), np.float32),
           W_dec=np.zeros((w, d), np.float32), b_enc=np.zeros(w, np.float32),
           b_dec=np.zeros(d, np.float32), threshold=np.zeros(w, np.float32))
  sae = dl.load(folder)
  assert dl.sites.site_of(sae) == dl.sites.Site(catalog.GS1_SITES[family], 5)
  assert sae.meta.l0 == 9
