"""The ``dictlearn`` console command: dispatches to the subcommands adapters register.

A subcommand is an entry point in the group ``dictlearn.commands`` whose target is a
``main(argv) -> int | None`` function; the penzai adapter registers ``tour`` and ``train``
(``[project.entry-points."dictlearn.commands"]`` in pyproject.toml). An entry point may name
the extras it needs (``tour = "pkg.tour:main [demo]"``); they are what the install hint
suggests when loading it fails. The core names no adapter: a new one registers its commands
in its own distribution.

Run as the console command (``argv`` not given), it turns on JAX's persistent compilation
cache in the dictlearn cache folder (``dictlearn.cache.enable_compilation_cache``), so a
command run again loads what it compiled before.

Exit codes: 0 for ``--help``, 2 for usage errors (no or an unknown command), 1 when a
command cannot be loaded, else the command's own.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable, Mapping

GROUP = "dictlearn.commands"


def commands(entry_points: Iterable[importlib.metadata.EntryPoint] | None = None
             ) -> dict[str, importlib.metadata.EntryPoint]:
  """The subcommands by name, sorted: the installed ``dictlearn.commands`` entry points, or
  ``entry_points`` when given. The first registration of a name wins."""
  if entry_points is None:
    entry_points = importlib.metadata.entry_points(group=GROUP)
  found = {}
  for ep in entry_points:
    found.setdefault(ep.name, ep)
  return dict(sorted(found.items()))


def _module_source(module: str) -> str | None:
  """The source of ``module`` found without importing it or its packages (None if not found)."""
  parts = module.split(".")
  try:
    spec = importlib.util.find_spec(parts[0])  # A top-level name: found, not run.
    for part in parts[1:]:
      if spec is None or not spec.submodule_search_locations:
        return None
      spec = importlib.machinery.PathFinder.find_spec(part, spec.submodule_search_locations)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
      return None
    with open(spec.origin, encoding="utf-8") as f:
      return f.read()
  except (ImportError, OSError, ValueError):
    return None


def describe(ep: importlib.metadata.EntryPoint) -> str:
  """One line about a command: its module docstring's first line, read without importing
  the module (so ``--help`` is quick and works without the adapter's extras), less a leading
  ````dictlearn NAME``:``."""
  source = _module_source(ep.module)
  try:
    doc = ast.get_docstring(ast.parse(source)) if source else None
  except SyntaxError:
    doc = None
  line = (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""
  for prefix in (f"``dictlearn {ep.name}``:", f"dictlearn {ep.name}:"):
    line = line.removeprefix(prefix).strip()
  return line


def install_hint(ep: importlib.metadata.EntryPoint) -> str:
  """What to install so that ``ep`` loads: its distribution with the extras it names."""
  dist = getattr(ep, "dist", None)
  name = dist.metadata["Name"] if dist is not None else "dictlearn"
  extras = ",".join(ep.extras)
  return f"pip install '{name}[{extras}]'" if extras else f"pip install '{name}'"


def usage(cmds: Mapping[str, importlib.metadata.EntryPoint], out=None) -> None:
  out = sys.stdout if out is None else out
  names = ",".join(cmds) or "COMMAND"
  print(f"usage: dictlearn {{{names}}} [options]   (dictlearn COMMAND --help for options)\n",
        file=out)
  if not cmds:
    print(f"  no commands are installed (none registered in the {GROUP!r} entry-point group); "
          "install an adapter, e.g. pip install 'dictlearn[demo]'", file=out)
  width = max((len(n) for n in cmds), default=0)
  for name, ep in cmds.items():
    print(f"  {name:{width}}  {describe(ep)}".rstrip(), file=out)


def main(argv: list[str] | None = None, *,
         entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> int:
  """Runs ``dictlearn COMMAND ...``; ``entry_points`` replaces the installed commands."""
  from_console = argv is None
  argv = sys.argv[1:] if argv is None else list(argv)
  cmds = commands(entry_points)
  if argv and argv[0] in ("-h", "--help"):
    usage(cmds)
    return 0
  if not argv:
    usage(cmds, sys.stderr)
    return 2
  if argv[0] not in cmds:
    print(f"dictlearn: unknown command {argv[0]!r}; the commands are "
          f"{', '.join(cmds) or '(none installed)'}\n", file=sys.stderr)
    usage(cmds, sys.stderr)
    return 2
  ep = cmds[argv[0]]
  if from_console:
    from dictlearn import cache
    cache.enable_compilation_cache()
  try:
    command = ep.load()
  except ImportError as e:
    print(f"dictlearn {argv[0]} could not be loaded ({ep.value}): {e}\n"
          f"It needs its adapter's extras: {install_hint(ep)}", file=sys.stderr)
    return 1
  return command(argv[1:]) or 0


if __name__ == "__main__":
  sys.exit(main())
