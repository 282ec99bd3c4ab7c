"""A user's mistake is one line on stderr, never a traceback.

Code that detects a mistake (a flag, config key or value, file, dataset, work directory)
raises `UsageError` with a message that names it and says what to do. Every command runs
its `main` through `run(main, command)` instead of `absl.app.run`, which prints

    mmjax.<command>: error: <message>

and exits with status 2 (USAGE_EXIT_CODE). Flag-parsing errors get the same treatment,
including ml_collections' unknown or misspelled `--config.KEY` (with its "did you mean").
Expected failures of a run that are not a mistake in how it was started (a non-finite loss
under `nonfinite_policy='stop'`, data past `data.max_skip_fraction`) are listed by the
command in `failures`: the same one line, exit status 1 (FAILURE_EXIT_CODE).

`--help` (also `-h`, `--helpshort`) prints the command's docstring and its own flags (those
defined by mmjax, not by the libraries it imports) and exits 0; `--helpfull` prints every
flag. Commands reach `run` through the one command skeleton, `mmjax.command.run`.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence

from absl import app, flags

USAGE_EXIT_CODE = 2
FAILURE_EXIT_CODE = 1


class UsageError(Exception):
  """A mistake in how a command was started; its message says what to do instead."""


class ConfigError(UsageError, ValueError):
  """A config value, a file it names, or the data it points at is wrong. The validation pass
  (`mmjax.cli.validate`) reports every problem it finds: one line each."""

  def __init__(self, *problems: str):
    super().__init__("\n".join(problems))
    self.problems = problems


def run(main: Callable[[list[str]], None], command: str, *,
        failures: Sequence[type[BaseException]] = ()) -> None:
  """absl's app.run(main) with one-line errors (see the module docstring)."""
  app.run(_guarded(main, command, tuple(failures)), flags_parser=_flags_parser(command))


def exit_with(command: str, message: str | Sequence[str], code: int) -> None:
  """Prints `message` (or each of several) as one `<command>: error: ...` line; exits."""
  for line in [message] if isinstance(message, str) else message:
    print(f"{command}: error: {one_line(line)}", file=sys.stderr, flush=True)
  sys.exit(code)


def one_line(message: str) -> str:
  return " ".join(str(message).split())


def _guarded(main: Callable, command: str, failures: tuple) -> Callable[[list[str]], None]:
  def guarded(argv: list[str]) -> None:
    try:
      main(argv)
    except UsageError as e:
      exit_with(command, getattr(e, "problems", None) or str(e), USAGE_EXIT_CODE)
    except failures as e:
      exit_with(command, str(e), FAILURE_EXIT_CODE)
  return guarded


HELP_ARGS = frozenset({"-h", "-help", "--help", "-?", "-helpshort", "--helpshort"})
FULL_HELP_ARGS = frozenset({"-helpfull", "--helpfull"})


def _flags_parser(command: str) -> Callable[[list[str]], list[str]]:
  def parse(argv: list[str]) -> list[str]:
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if FULL_HELP_ARGS & set(args):
      print(flags.FLAGS.get_help(), flush=True)
      sys.exit(0)
    if HELP_ARGS & set(args):
      print(command_help(command), flush=True)
      sys.exit(0)
    try:
      args = flags.FLAGS(argv)
    except Exception as e:  # flags.Error, and config_flags' KeyError for unknown keys
      exit_with(command, flag_error_message(e, argv), USAGE_EXIT_CODE)
    _check_config_loaded(command)
    return args
  return parse


def command_help(command: str) -> str:
  """The running command's docstring and the flags mmjax defines for it, one per line."""
  package = os.path.dirname(os.path.abspath(__file__))
  own = [flag for module, module_flags in sorted(flags.FLAGS.flags_by_module_dict().items())
         if module.startswith("mmjax") or os.path.abspath(module).startswith(package + os.sep)
         for flag in module_flags]
  doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
  lines = [doc, ""] if doc else []
  lines.append(f"{command} flags:")
  for flag in sorted(own, key=lambda f: f.name):
    name = f"--[no]{flag.name}" if flag.flag_type() == "bool" else f"--{flag.name}"
    default = "required" if flag.default is None and _is_required(flag.name) else (
        f"default: {flag.default_as_str.strip(chr(39))}" if flag.default is not None
        else "optional")
    lines.append(textwrap.fill(f"{name}: {one_line(flag.help)} ({default})", width=100,
                               initial_indent="  ", subsequent_indent="      "))
  if "config" in flags.FLAGS:
    lines.append("  --config.KEY=VALUE: override one key of the config; every key, its type "
                 "and default: configs/schema.py")
  lines.append("Every flag, the libraries' too: --helpfull")
  return "\n".join(lines)


def _is_required(name: str) -> bool:
  """absl's mark_flag_as_required is a validator "must have a value other than None"."""
  return any("must have a value other than None" in getattr(v, "message", "")
             for v in flags.FLAGS[name].validators)


def _check_config_loaded(command: str) -> None:
  """config_flags defers a config file's load error to the first use of the flag."""
  if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
    return
  try:
    flags.FLAGS["config"].value.keys  # noqa: B018 (a placeholder raises the deferred error)
  except OSError as e:
    last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    path = flags.FLAGS["config"].config_filename
    exit_with(command, f"--config={path}: {last}{_repository_hint(path)}", USAGE_EXIT_CODE)


def _repository_hint(path: str) -> str:
  """A misspelled file name gets the closest names in its folder; relative config paths are
  read from the working directory, so the repository's configs/ from anywhere else is found
  only by its full path."""
  folder, name = os.path.split(path)
  if os.path.isdir(folder or "."):
    close = difflib.get_close_matches(name, os.listdir(folder or "."), n=1)
    return f" (did you mean {os.path.join(folder, close[0])}?)" if close else ""
  if os.path.isabs(path):
    return ""
  repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  candidate = os.path.join(repository, path)
  if not os.path.exists(candidate):
    return ""
  return f" (relative to {os.getcwd()}): run from {repository} or pass --config={candidate}"


def flag_error_message(error: Exception, argv: Sequence[str]) -> str:
  """One line for a flag-parsing error, naming the offending argument."""
  while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(..))
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  if isinstance(error, KeyError):
    # ml_collections: "'bogus'" or "'batch_sise'\nDid you mean "batch_size" instead of ...?"
    first, _, hint = text.partition("\n")
    key = first.strip().strip("'\"")
    argument = next((a for a in argv[1:] if re.match(rf"--config\.(.*\.)?{re.escape(key)}(\.|=|$)",
                                                      a)), None)
    where = f" ({argument})" if argument else ""
    suggestion = (f": did you mean {hint.split(' instead of')[0].split('mean ')[1]}?"
                  if hint.startswith("Did you mean") else
                  ": no such key in the config file (--config)")
    return f"unknown config key {key!r}{where}{suggestion}"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):  # an error inside get_config()
    return f"{lines[0].rstrip(':')}: {lines[-1]}"
  return "; ".join(lines) + " (see --helpshort)"
