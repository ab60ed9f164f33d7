"""The core and the Gemma package import no neural-network framework.

Each module in MODULES is imported in a fresh interpreter (the test session's own imports
would hide what a module pulls in), which then asserts that none of FRAMEWORKS was loaded.
"""

import subprocess
import sys

import pytest

FRAMEWORKS = ("penzai", "treescope", "flax", "equinox")

MODULES = [
    "dictlearn",
    "dictlearn.catalog",
    "dictlearn.cli",
    "dictlearn_gemma",
    "dictlearn_gemma.config",
    "dictlearn_gemma.params",
    "dictlearn_gemma.load_gguf",
    "dictlearn_gemma.load_safetensors",
    "dictlearn_gemma.load_orbax",
    "dictlearn_gemma.tokenizer",
    "dictlearn_gemma.loading",
]

_CHECK = """
import importlib, sys
importlib.import_module({module!r})
loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({frameworks!r}))
assert not loaded, f"importing {module} loaded {{loaded}}"
"""


@pytest.mark.parametrize("module", MODULES)
def test_imports_no_framework(module):
  code = _CHECK.format(module=module, frameworks=FRAMEWORKS)
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
