"""Headless Chromium for the tests of generated HTML pages: the DOM after the scripts ran."""

import re
import shutil
import subprocess

import pytest


def chromium() -> str:
  """The Chromium executable; fails the test (saying how to install it) when there is none."""
  for name in ("chromium", "chromium-browser", "google-chrome"):
    if shutil.which(name):
      return shutil.which(name)
  pytest.fail("headless Chromium is needed for this test: apt-get install chromium "
              "(./run.sh test installs it)")


def dump_dom(url: str, profile, budget_ms: int = 10000) -> str:
  """The serialised DOM of ``url`` once its scripts ran (``profile``: a fresh folder)."""
  run = subprocess.run(
      [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
       "--no-first-run", "--disable-background-networking", "--disable-component-update",
       "--disable-sync", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
       "--dump-dom", url],
      capture_output=True, text=True, timeout=120)
  assert "<html" in run.stdout, f"Chromium printed no DOM: {run.stderr[-2000:]}"
  return run.stdout


def html_tag(dom: str) -> str:
  """The opening <html> tag: the pages' error hook records script errors on it."""
  return re.search(r"<html[^>]*>", dom).group(0)
