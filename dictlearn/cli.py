"""The ``dictlearn`` console command: ``dictlearn tour ...`` and ``dictlearn train ...``.

Both subcommands need a model, so they live in the penzai adapter; this entry point only
dispatches, keeping the core free of model code.
"""

from __future__ import annotations

import sys

_COMMANDS = {
    "tour": ("dictlearn_penzai.tour", "the Gemma Scope 2 tour on a real Gemma 3, with a report"),
    "train": ("dictlearn_penzai.train_cli", "harvest activations from Gemma 3 and train a dictionary"),
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
    print("usage: dictlearn {tour,train} [options]   (dictlearn COMMAND --help for options)\n")
    for name, (_, what) in _COMMANDS.items():
      print(f"  {name:6} {what}")
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  module_name, _ = _COMMANDS[argv[0]]
  try:
    import importlib
    module = importlib.import_module(module_name)
  except ImportError as e:
    print(f"dictlearn {argv[0]} needs the penzai adapter's extras: "
          f"pip install 'dictlearn[demo]' ({e})", file=sys.stderr)
    return 1
  return module.main(argv[1:]) or 0


if __name__ == "__main__":
  sys.exit(main())
