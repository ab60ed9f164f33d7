"""The ``dictlearn`` command: subcommands come from the ``dictlearn.commands`` entry points
(the penzai adapter's tour and train), dispatch, help, usage errors and the install hint."""

from importlib.metadata import EntryPoint


from dictlearn import cli

CALLS = []


def fake_main(argv):
  """``dictlearn fake``: records its arguments."""
  CALLS.append(list(argv))
  return 3


def _entry_point(name, value):
  return EntryPoint(name, value, cli.GROUP)


def test_installed_commands_are_tour_and_train_with_descriptions(capsys):
  cmds = cli.commands()
  assert {"tour", "train"} <= set(cmds)
  assert cmds["tour"].value.startswith("dictlearn_penzai.tour:")
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "usage: dictlearn {" in out
  lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
  assert "Gemma Scope 2" in lines["tour"] and "train a dictionary" in lines["train"]


def test_dispatches_to_the_entry_point_with_the_remaining_arguments():
  CALLS.clear()
  eps = [_entry_point("fake", f"{__name__}:fake_main")]
  assert cli.main(["fake", "--x", "1"], entry_points=eps) == 3
  assert CALLS == [["--x", "1"]]


def test_usage_errors_exit_2(capsys):
  eps = [_entry_point("fake", f"{__name__}:fake_main")]
  assert cli.main([], entry_points=eps) == 2
  assert cli.main(["nope"], entry_points=eps) == 2
  err = capsys.readouterr().err
  assert "unknown command 'nope'" in err and "fake" in err
  # The help lists it with its module docstring's first line.
  assert "fake  The ``dictlearn`` command: subcommands come from" in err


def test_a_command_that_cannot_load_names_its_extras(capsys):
  eps = [_entry_point("broken", "dictlearn_no_such_adapter.cmd:main [demo]")]
  assert cli.main(["broken"], entry_points=eps) == 1
  err = capsys.readouterr().err
  assert "dictlearn broken could not be loaded" in err and "dictlearn_no_such_adapter" in err
  assert "pip install 'dictlearn[demo]'" in err
  assert cli.main(["--help"], entry_points=eps) == 0  # Help does not import the command.


def test_console_script_help_exits_0():
  import subprocess
  import sys

  run = subprocess.run([sys.executable, "-m", "dictlearn.cli", "--help"], capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "tour" in run.stdout and "train" in run.stdout


def _cache_dir_after(code, env):
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "DICTLEARN_COMPILATION_CACHE")} | env
  out = subprocess.run([sys.executable, "-c", code + "\nimport jax\n"
                        "print('DIR=' + str(jax.config.jax_compilation_cache_dir))"],
                       env=env, capture_output=True, text=True, check=True).stdout
  return out.rsplit("DIR=", 1)[1].strip()


def test_the_compilation_cache_goes_in_the_cache_folder_unless_told_otherwise(tmp_path):
  enable = "from dictlearn import cache\ncache.enable_compilation_cache()\n"
  assert _cache_dir_after(enable, {"DICTLEARN_CACHE": str(tmp_path)}) == str(tmp_path / "jax")
  # Off when asked, and a folder the user chose is kept.
  assert _cache_dir_after(enable, {"DICTLEARN_CACHE": str(tmp_path),
                                   "DICTLEARN_COMPILATION_CACHE": "0"}) == "None"
  assert _cache_dir_after(enable, {"DICTLEARN_CACHE": str(tmp_path),
                                   "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")}
                          ) == str(tmp_path / "mine")


def test_a_console_command_runs_with_the_compilation_cache_on_and_a_call_without(tmp_path):
  # main() as the console script calls it (argv from sys.argv) turns the cache on; a call
  # from Python with argv leaves JAX's settings alone.
  code = ("import sys\nfrom importlib.metadata import EntryPoint\nfrom dictlearn import cli\n"
          "sys.argv = ['dictlearn', 'fake']\n"
          "ep = EntryPoint('fake', 'json:dumps', cli.GROUP)\n"
          "try:\n  cli.main(entry_points=[ep])\nexcept TypeError:\n  pass\n")
  assert _cache_dir_after(code, {"DICTLEARN_CACHE": str(tmp_path)}) == str(tmp_path / "jax")
  in_python = code.replace("cli.main(entry_points=[ep])", "cli.main(['fake'], entry_points=[ep])")
  assert _cache_dir_after(in_python, {"DICTLEARN_CACHE": str(tmp_path)}) == "None"
