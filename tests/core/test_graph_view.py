"""dictlearn.graph_view: the attribution-graph page, its validation, and the page in headless
Chromium (nodes drawn, ``#node=`` and clicks fill the panel, hover tooltips, no script
errors, markup from the graph shown as text and never run)."""

import copy
import html
import json
import re

import pytest
from chromium import dump_dom, html_tag

from dictlearn.graph_view import graph_html, write_graph_html

EVIL = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "&amp;", "\"q'"]
TOKENS = ["<bos>"] + EVIL + [" Paris"]


def _node(node_id, layer, pos, feature_type, **extra):
  feature = int(node_id.split("_")[1])
  return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos,
          "feature_type": feature_type, "jsNodeId": node_id, "clerp": "", "influence": None,
          "activation": None, "token_prob": 0.0, "is_target_logit": False, **extra}


def make_graph():
  """Three layers, six positions: tokens, four latents, an error node, a logit."""
  clt = "cross layer transcoder"
  nodes = [_node(f"E_{100 + p}_{p}", "E", p, "embedding", influence=0.1) for p in range(6)]
  nodes += [
      _node("0_7_1", "0", 1, clt, activation=1.5, influence=0.3,
            clerp="<script>alert(2)</script> clerp",
            logit_lens={"top": ["<img src=x onerror=alert(3)>", " Paris"],
                        "bottom": ["&lt;", "\u2028x"]},
            dashboard_url="https://www.neuronpedia.org/gemma-3-270m/0-clt/7"),
      _node("1_12_2", "1", 2, clt, activation=0.25, influence=0.5),
      _node("2_3_5", "2", 5, clt, activation=3.0, influence=0.7, clerp="capital cities"),
      _node("2_4_5", "2", 5, clt, activation=0.5, influence=0.2),
      _node("1_-1_5", "1", 5, "mlp reconstruction error", influence=0.05),
      _node("4_9999_5", "4", 5, "logit", token_prob=0.412, is_target_logit=True,
            clerp='Output " Paris" (p=0.412)'),
  ]
  links = [("E_101_1", "0_7_1", 0.625), ("0_7_1", "1_12_2", -0.375),
           ("E_102_2", "1_12_2", 0.8), ("1_12_2", "2_3_5", 1.25), ("1_-1_5", "2_3_5", -0.0625),
           ("2_3_5", "4_9999_5", 2.5), ("2_4_5", "4_9999_5", -0.4375), ("0_7_1", "2_4_5", 0.1875),
           ("E_105_5", "4_9999_5", 0.3)]
  return {"metadata": {"slug": "evil-graph", "scan": "test", "prompt_tokens": TOKENS,
                       "prompt": "".join(TOKENS), "node_threshold": 0.8},
          "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                      "sg_pos": ""},
          "nodes": nodes, "links": [{"source": s, "target": t, "weight": w} for s, t, w in links]}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
  return write_graph_html(make_graph(), tmp_path_factory.mktemp("graph") / "graph.html")


def _panel(dom):
  return re.search(r'<aside id="panel">(.*?)</aside>', dom, re.S).group(1)


def test_page_is_self_contained_and_graph_text_is_escaped(page):
  text = page.read_text(encoding="utf-8")
  for bad in ("<script>alert", "<img", "</script> clerp", "\u2028"):
    assert bad not in text
  markup = re.sub(r"<script.*?</script>", "", text, flags=re.S)
  assert not re.search(r'(src|href)="?(https?:|//)', markup), "the page fetches something"
  data = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', text, re.S)
  view = json.loads(data.group(1))
  assert view["tokens"] == TOKENS and view["nodes"][6]["lens"]["bottom"] == ["&lt;", "\u2028x"]
  assert "<title>evil-graph</title>" in text
  titled = graph_html(make_graph(), title="<b>t</b> & co")
  assert "<title>&lt;b&gt;t&lt;/b&gt; &amp; co</title>" in titled and "<b>t" not in titled


def test_layout_rows_by_layer_and_columns_by_position(page):
  text = page.read_text(encoding="utf-8")
  view = json.loads(re.search(r'id="graph-data">(.*?)</script>', text, re.S).group(1))
  assert view["rows"] == ["emb", "L0", "L1", "L2", "logit"]
  ys = {n["id"]: n["y"] for n in view["nodes"]}
  assert ys["E_100_0"] > ys["0_7_1"] > ys["1_12_2"] > ys["2_3_5"] > ys["4_9999_5"]
  assert ys["1_12_2"] == ys["1_-1_5"] and ys["2_3_5"] == ys["2_4_5"]
  xs = {n["id"]: n["x"] for n in view["nodes"]}
  assert xs["E_101_1"] == xs["0_7_1"] < xs["E_102_2"] == xs["1_12_2"] < xs["2_3_5"] != xs["2_4_5"]
  kinds = {n["id"]: (n["kind"], n["latent"]) for n in view["nodes"]}
  assert kinds["0_7_1"] == ("feature", 7) and kinds["1_-1_5"][0] == "error"
  assert kinds["E_100_0"][0] == "embedding" and kinds["4_9999_5"] == ("logit", 9999)


def _without(graph, path):
  g = copy.deepcopy(graph)
  *parents, key = path
  target = g
  for p in parents:
    target = target[p]
  del target[key]
  return g


@pytest.mark.parametrize("path, message", [
    (("links",), 'graph has no "links"'),
    (("metadata",), 'graph has no "metadata"'),
    (("metadata", "prompt_tokens"), 'graph\\["metadata"\\] has no "prompt_tokens"'),
    (("nodes", 7, "ctx_idx"), 'graph\\["nodes"\\]\\[7\\] has no "ctx_idx"'),
    (("links", 2, "weight"), 'graph\\["links"\\]\\[2\\] has no "weight"'),
])
def test_missing_keys_are_named(path, message):
  with pytest.raises(ValueError, match=message):
    graph_html(_without(make_graph(), path))


@pytest.mark.parametrize("change, message", [
    (lambda g: g["links"][3].update(target="nope_1_2"),
     'graph\\["links"\\]\\[3\\]: target \'nope_1_2\' is not a node'),
    (lambda g: g["links"][0].update(weight=float("nan")), 'links"\\]\\[0\\].weight is nan'),
    (lambda g: g["nodes"][6].update(ctx_idx=6), "ctx_idx 6 is not a position of the 6"),
    (lambda g: g["nodes"][7].update(node_id="0_7_1"), "'0_7_1' appears twice"),
    (lambda g: g["nodes"][6].update(dashboard_url="javascript:alert(1)"), "not an http"),
    (lambda g: g["nodes"][6].update(logit_lens={"top": [1]}), "logit_lens must be"),
])
def test_malformed_graphs_are_refused(change, message):
  g = make_graph()
  change(g)
  with pytest.raises(ValueError, match=message):
    graph_html(g)


def test_hash_selects_a_node_and_lists_its_edges_by_weight(page, tmp_path):
  dom = dump_dom(page.as_uri() + "#node=1_12_2", tmp_path / "profile")
  assert "data-js-errors" not in html_tag(dom), html_tag(dom)
  assert len(re.findall(r'<(circle|rect) [^>]*class="node ', dom)) == len(make_graph()["nodes"])
  assert 'class="node feature selected" data-node-id="1_12_2"' in dom
  assert 'class="node logit target"' in dom and 'class="node error"' in dom
  assert len(re.findall(r'class="edge (pos|neg) hl"', dom)) == 3
  panel = _panel(dom)
  rows = re.findall(r'<li class="(pos|neg)" data-node-id="([^"]+)"><span class="w">([^<]+)</span>',
                    panel)
  assert rows == [("pos", "E_102_2", "+0.800"), ("neg", "0_7_1", "-0.375"),
                  ("pos", "2_3_5", "+1.25")]
  assert "Inputs (2)" in panel and "Outputs (1)" in panel
  assert "&lt;script&gt;alert(2)&lt;/script&gt; clerp" in panel  # 0_7_1's label, as text
  assert "&lt;img src=x onerror=alert(1)&gt;" in dom and "<img" not in dom
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


_ALERT_TRAP = ('<script>window.alert = function () {'
               ' document.documentElement.setAttribute("data-alerted", "1"); };</script>')
_PROBE = """<pre id="probe-tip"></pre><script>
(function () {
  var node = function (id) { return document.querySelector('.node[data-node-id="' + id + '"]'); };
  node("0_7_1").dispatchEvent(new MouseEvent("mouseenter", {clientX: 5, clientY: 5}));
  document.getElementById("probe-tip").textContent = document.getElementById("tip").textContent;
  node("2_3_5").dispatchEvent(new MouseEvent("click", {bubbles: true}));
  document.documentElement.setAttribute("data-probe", "imgs=" +
    document.querySelectorAll("img").length + " scripts=" + document.scripts.length +
    " hash=" + location.hash);
})();
</script>"""


def test_hover_and_click_show_text_and_never_run_graph_markup(page, tmp_path):
  text = page.read_text(encoding="utf-8").replace("<head>", "<head>" + _ALERT_TRAP, 1)
  text = text.replace("</body>", _PROBE + "</body>", 1)
  probed = tmp_path / "probed.html"
  probed.write_text(text, encoding="utf-8")
  dom = dump_dom(probed.as_uri(), tmp_path / "profile")
  tag = html_tag(dom)
  assert "data-js-errors" not in tag and "data-alerted" not in tag, tag
  assert f'data-probe="imgs=0 scripts={text.count("<script")} hash=#node=2_3_5"' in tag
  tip = html.unescape(re.search(r'<pre id="probe-tip">(.*?)</pre>', dom, re.S).group(1))
  for part in ("<script>alert(2)</script> clerp", "position 1: \u201c<script>alert(1)</script>\u201d",
               "latent 7 at layer 0", "activation 1.50", "influence 0.300",
               "\u201c<img src=x onerror=alert(3)>\u201d \u201c Paris\u201d", "\u201c&lt;\u201d"):
    assert part in tip, (part, tip)
  panel = _panel(dom)
  assert "<h2>capital cities</h2>" in panel
  rows = re.findall(r'data-node-id="([^"]+)"><span class="w">([^<]+)</span>', panel)
  assert rows == [("1_12_2", "+1.25"), ("1_-1_5", "-0.0625"), ("4_9999_5", "+2.50")]
