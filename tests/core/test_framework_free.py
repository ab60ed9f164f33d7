"""The core and the Gemma package import no neural-network framework.

A fresh interpreter (the test session's own imports would hide what a module pulls in)
imports each module of MODULES in turn and checks after each one that none of FRAMEWORKS
was loaded, so a failure names the module that pulled it in. In the core test environment
(``run.sh test``) none of them is installed at all.
"""

import subprocess
import sys

FRAMEWORKS = ("penzai", "treescope", "flax", "equinox")

MODULES = [
    "dictlearn",
    "dictlearn.dictionary",
    "dictlearn.sites",
    "dictlearn.interventions",
    "dictlearn.analysis",
    "dictlearn.evals",
    "dictlearn.graphs",
    "dictlearn.crosslayer",
    "dictlearn.attribution",
    "dictlearn.report",
    "dictlearn.graph_view",
    "dictlearn.metrics",
    "dictlearn.sparse",
    "dictlearn.sharding",
    "dictlearn.pallas_encode",
    "dictlearn.io",
    "dictlearn.catalog",
    "dictlearn.activation_data",
    "dictlearn.train",
    "dictlearn.cli",
    "dictlearn.cache",
    "dictlearn.distributed",
    "dictlearn.dashboards",
    "dictlearn_gemma",
    "dictlearn_gemma.config",
    "dictlearn_gemma.params",
    "dictlearn_gemma.load_gguf",
    "dictlearn_gemma.load_safetensors",
    "dictlearn_gemma.load_orbax",
    "dictlearn_gemma.tokenizer",
    "dictlearn_gemma.loading",
    "dictlearn_gemma.corpus",
    "dictlearn_gemma.image_preprocess",
    "dictlearn_gemma.vision",
    "dictlearn_gemma.load_vision",
]

_CHECK = """
import importlib, sys
for module in {modules!r}:
  importlib.import_module(module)
  loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({frameworks!r}))
  assert not loaded, f"importing {{module}} loaded {{loaded}}"
"""


def test_core_and_gemma_import_no_framework():
  code = _CHECK.format(modules=MODULES, frameworks=FRAMEWORKS)
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]


def test_the_check_catches_a_loaded_framework():
  code = _CHECK.format(modules=["json"], frameworks=("json",))
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert run.returncode != 0 and "importing json loaded ['json']" in run.stderr
