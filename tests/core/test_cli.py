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
