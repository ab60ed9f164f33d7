"""dictlearn.sites: one spelling of a site, Gemma Scope hook points both ways, and the one
rule for where a dictionary reads and writes."""

import jax
import pytest
from hypothesis import given, strategies as st

import dictlearn
from dictlearn import sites
from dictlearn.sites import Site

site_st = st.builds(Site, st.sampled_from(sites.KINDS), st.integers(0, 200))


@given(site_st)
def test_str_parse_round_trip(site):
  assert Site.parse(str(site)) == site
  assert sites.as_site(str(site)) == site
  assert hash(Site.parse(str(site))) == hash(site)
  assert str(site) == f"{site.kind}.{site.layer}"


@given(site_st.filter(lambda s: s.kind != "resid_mid"))
def test_hook_point_round_trip(site):
  # resid_mid has no transformers module, so its hook point is ours alone.
  assert Site.from_hook_point(site.hook_point) == site


def test_constructors():
  for fn in (sites.resid_pre, sites.resid_mid, sites.resid_post, sites.attn_z,
             sites.attn_out, sites.mlp_in, sites.mlp_out):
    assert fn(4) == Site(fn.__name__, 4)


@pytest.mark.parametrize("text, site", [
    ("model.layers.9.output", Site("resid_post", 9)),
    ("model.layers.22.self_attn.o_proj.input", Site("attn_z", 22)),
    ("model.layers.5.pre_feedforward_layernorm.output", Site("mlp_in", 5)),
    ("model.layers.5.post_feedforward_layernorm.output", Site("mlp_out", 5)),
    ("model.layers.0.post_attention_layernorm.output", Site("attn_out", 0)),
    ("blocks.3.hook_resid_post", Site("resid_post", 3)),
    ("resid_post_9", Site("resid_post", 9)),
    ("mlp_in(3)", Site("mlp_in", 3)),
])
def test_parse_other_spellings(text, site):
  assert Site.parse(text) == site


@pytest.mark.parametrize("bad", ["resid_posts.9", "model.layers.x.output", "mlp.3", ""])
def test_unknown_names_are_clear_errors(bad):
  with pytest.raises(ValueError, match="names no site|no known site"):
    Site.parse(bad)


def test_bad_kind_or_layer():
  with pytest.raises(ValueError, match="unknown site kind 'resid'"):
    Site("resid", 1)
  with pytest.raises(ValueError, match="non-negative"):
    Site("resid_post", -1)
  with pytest.raises(TypeError, match="cannot make a site"):
    sites.as_site(3.5)


def test_as_site_takes_any_marker_with_kind_and_layer():
  class Marker:  # What an adapter's hook layer looks like.
    kind, layer = "mlp_out", 4
  assert sites.as_site(Marker()) == sites.mlp_out(4)
  assert sites.as_site(("attn_z", 2)) == sites.attn_z(2)


def _dict(kind="sae", **meta):
  return dictlearn.random_dictionary(
      jax.random.key(0), 8, 16, kind=kind, meta=dictlearn.DictMeta(kind=kind, **meta))


def test_read_write_rule():
  sae = _dict(site="resid_post", layer=7)
  assert sites.read_write(sae) == (sites.resid_post(7), sites.resid_post(7))
  assert sites.read_write(sae, "resid_pre.2") == (sites.resid_pre(2), sites.resid_pre(2))
  with pytest.raises(ValueError, match="an SAE writes where it reads"):
    sites.read_write(sae, "resid_post.7", "mlp_out.7")
  by_hook = _dict(hook_point_in="model.layers.3.output")
  assert sites.site_of(by_hook) == sites.site_of(by_hook, "out") == sites.resid_post(3)

  # A transcoder writes mlp_out of the layer it reads, unless its metadata says otherwise.
  tc = _dict("transcoder", site="mlp_in", layer=6)
  assert sites.read_write(tc) == (sites.mlp_in(6), sites.mlp_out(6))
  assert sites.read_write(tc, "mlp_in.2") == (sites.mlp_in(2), sites.mlp_out(2))
  to_resid = _dict("transcoder", site="resid_mid", layer=6, site_out="resid_post")
  assert sites.read_write(to_resid) == (sites.resid_mid(6), sites.resid_post(6))
  # Moved to another layer, the metadata's output site no longer applies.
  assert sites.read_write(to_resid, "resid_mid.1") == (sites.resid_mid(1), sites.mlp_out(1))
  assert sites.read_write(tc, "mlp_in.1", "resid_post.3") == (sites.mlp_in(1),
                                                              sites.resid_post(3))
  hooked = _dict("transcoder",
                 hook_point_in="model.layers.5.pre_feedforward_layernorm.output",
                 hook_point_out="model.layers.5.post_feedforward_layernorm.output")
  assert sites.read_write(hooked) == (sites.mlp_in(5), sites.mlp_out(5))

  with pytest.raises(ValueError, match="pass the site explicitly"):
    sites.read_write(_dict())
  with pytest.raises(ValueError, match="which must be"):
    sites.site_of(sae, "both")


def test_saved_config_names_the_rule_sites(tmp_path):
  tc = _dict("transcoder", site="mlp_in", layer=6)
  loaded = dictlearn.load(dictlearn.save(tc, tmp_path / "tc"))
  assert loaded.meta.hook_point_in == sites.mlp_in(6).hook_point
  assert loaded.meta.hook_point_out == sites.mlp_out(6).hook_point
  assert sites.read_write(loaded) == sites.read_write(tc)
