"""Every command runs through the one skeleton (mmjax.command): `--help` exits 0 and lists the
command's own flags with the pointer to configs/schema.py; a user's mistake is one line on
stderr, exit status 2. The commands are found, not listed: every mmjax module with a
`__main__` block."""
import ast
import pathlib
import sys

import pytest

import helpers
from conftest import REPO


def _main_block(path: pathlib.Path) -> ast.If | None:
  for node in ast.parse(path.read_text()).body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and getattr(node.test.left, "id", None) == "__name__"):
      return node
  return None


def _command_name(path: pathlib.Path) -> str:
  """mmjax/train.py -> mmjax.train; mmjax/ingest/__main__.py -> mmjax.ingest."""
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__main__" else parts)


COMMANDS = {_command_name(p): p for p in sorted(pathlib.Path(REPO, "mmjax").rglob("*.py"))
            if _main_block(p)}


def _calls(node: ast.AST) -> set[str]:
  return {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}


def _runs_the_skeleton(module: str) -> bool:
  """Its __main__ block calls command.run, or the run() of a module that does (the importer:
  mmjax.ingest and its old name mmjax.data.build share mmjax.ingest.cli.run)."""
  calls = _calls(_main_block(COMMANDS[module]))
  return "command.run" in calls or ("cli.run" in calls and "command.run(" in pathlib.Path(
      REPO, "mmjax/ingest/cli.py").read_text())


def _takes_a_config(module: str) -> bool:
  block = _main_block(COMMANDS[module])
  return "cli.run" not in _calls(block) and "config=False" not in ast.unparse(block)


def test_the_commands_are_found():
  assert {"mmjax.train", "mmjax.evaluate", "mmjax.aot", "mmjax.summary", "mmjax.ingest",
          "mmjax.data.build", "mmjax.data.preview", "mmjax.convert.openclip", "mmjax.convert",
          "mmjax.export", "mmjax.embed", "mmjax.interpolate"} <= set(COMMANDS)


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_runs_through_the_skeleton(module):
  assert _runs_the_skeleton(module), f"{module}: end its __main__ block with command.run(...)"
  calls = _calls(_main_block(COMMANDS[module]))
  assert not calls & {"app.run", "errors.run", "config_flags.DEFINE_config_file"}, calls


@pytest.mark.parametrize("module", COMMANDS)
def test_help_exits_0_and_lists_the_commands_own_flags(module):
  proc = helpers.call([sys.executable, "-m", module, "--help"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  own = proc.stdout.split(f"{module} flags:\n", 1)[1]
  flag_names = {line.split(":")[0].strip() for line in own.splitlines()
                if line.startswith("  --")}
  assert flag_names, own
  assert not any("verbosity" in n or "grain" in n for n in flag_names), flag_names  # libraries'
  if "--config" in flag_names:
    assert "configs/schema.py" in own


def test_help_lists_the_flags_of_train():
  proc = helpers.call([sys.executable, "-m", "mmjax.train", "-h"])
  assert proc.returncode == 0
  own = proc.stdout.split("mmjax.train flags:")[1]
  assert "--workdir: Work directory (checkpoints, metrics, eval). (required)" in own
  assert "--heartbeat_timeout_seconds:" in own and "(default: 60)" in own


def test_helpfull_exits_0_with_every_flag():
  proc = helpers.call([sys.executable, "-m", "mmjax.summary", "--helpfull"])
  assert proc.returncode == 0 and "--verbosity" in proc.stdout and "--config" in proc.stdout


@pytest.mark.parametrize("module", COMMANDS)
def test_an_unknown_flag_is_one_line_exit_2(module):
  proc = helpers.call([sys.executable, "-m", module, "--no_such_flag=1"])
  line = helpers.usage_error(proc, module)
  assert "no_such_flag" in line


@pytest.mark.parametrize("module", [m for m in COMMANDS if _takes_a_config(m)])
def test_an_unknown_config_key_is_one_line_exit_2(module):
  line = helpers.usage_error(helpers.run_cli(module, "--config.bogus=1"), module)
  assert "unknown config key 'bogus' (--config.bogus=1)" in line


def test_a_config_value_summary_cannot_use_is_one_line_exit_2():
  line = helpers.usage_error(helpers.run_cli("mmjax.summary", "--config.model.name=nope"),
                             "mmjax.summary")
  assert "model.name='nope'" in line
