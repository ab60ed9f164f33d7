"""Starting the many-process tests' workers on localhost, and comparing their results."""

import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(script, workdir, n: int = 2, devices: int = 1):
  """Starts n processes of ``script PORT n i workdir`` (CPU, ``devices`` devices each);
  returns the Popen list. They join through a coordinator on a free local port."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  port = free_port()
  return [subprocess.Popen([sys.executable, str(script), str(port), str(n), str(i),
                            str(workdir)], env=env, cwd=os.path.dirname(script),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(n)]


def wait(procs, timeout: float = 300):
  """Waits for every process; fails with the output of one that failed."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, f"a worker failed (exit {p.returncode}):\n{out[-4000:]}"


def assert_nested_close(a, b, rel: float = 1e-12, path: str = ""):
  """JSON-like trees equal, floats within ``rel``."""
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for k in a:
      assert_nested_close(a[k], b[k], rel, f"{path}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (u, v) in enumerate(zip(a, b)):
      assert_nested_close(u, v, rel, f"{path}[{i}]")
  elif isinstance(a, float):
    assert b == pytest.approx(a, rel=rel, abs=1e-15), path
  else:
    assert a == b, path
