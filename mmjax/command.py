"""One skeleton for every mmjax command: its flags, `--help`, its errors, its logs.

A command (`python -m mmjax.NAME`) defines only its own flags and a `main`, and ends with

  from absl import flags
  from mmjax import command

  _OUT = flags.DEFINE_string("out", None, "Where to write ...")  # its own flags, if any

  def main(argv: list[str]) -> None:
    config = command.config()  # --config FILE[:ARG] with --config.KEY=VALUE overrides
    ...

  if __name__ == "__main__":
    command.run(main, "mmjax.NAME", required=("out",))

`run` then, in this order and the same way for every command:
- asks for several CPU devices' thread pool before JAX starts a backend
  (`mmjax.devices.configure_cpu_devices`), and, with `cpu_only=True` (compile-only
  commands: shapes and programs, never an accelerator), makes the CPU JAX's only platform;
- defines `--config` (`config=True`, the default; required unless `config_required=False`;
  `config_help` says which files fit)
  as ml_collections config_flags do, locked, so `--config.KEY=VALUE` overrides are
  type-checked and a misspelled key gets a "did you mean"; every key, its type and default
  is in configs/schema.py;
- marks `required` flags as required;
- runs `main` through `mmjax.errors.run`: a user's mistake (a flag, a config key or value,
  a file: `errors.UsageError`) is one line `mmjax.NAME: error: ...` on stderr, exit status
  2; `failures` (expected failures of a run) are one line, exit status 1; `--help` lists the
  command's own flags and exits 0 (`--helpfull`: every flag);
- quiets the libraries' logs once, after the flags are parsed (`quiet_libraries`): absl
  (Orbax, TFDS, optax) to `log_level` unless `--verbosity` is given, TFDS's progress bars off.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from mmjax import devices, errors

CONFIG_HELP = "Config file[:ARG], e.g. configs/coca.py:base (overrides: --config.KEY=VALUE)."


def run(main: Callable[[list[str]], None], command: str, *, config: bool = True,
        config_required: bool = True, config_help: str = CONFIG_HELP,
        required: Sequence[str] = (),
        failures: Sequence[type[BaseException]] = (), cpu_only: bool = False,
        log_level: int = logging.WARNING) -> None:
  """Runs `main` as the command `command` (e.g. "mmjax.train"); see the module docstring."""
  devices.configure_cpu_devices()
  if cpu_only:
    import jax  # pylint: disable=import-outside-toplevel (only a compile-only command needs it)
    jax.config.update("jax_platforms", "cpu")
  if config:
    define_config_flag(config_help)
  required = [*required, *(["config"] if config and config_required else [])]
  if required:
    flags.mark_flags_as_required(required)

  def quiet_main(argv: list[str]) -> None:
    quiet_libraries(log_level)
    main(argv)

  errors.run(quiet_main, command, failures=failures)


def define_config_flag(help_text: str = CONFIG_HELP) -> None:
  """`--config FILE[:ARG]` and its `--config.KEY=VALUE` overrides, the config locked."""
  config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


def config() -> ml_collections.ConfigDict:
  """The `--config` given, overrides applied (None if the command's config is optional and
  none was given)."""
  return flags.FLAGS.config


def quiet_libraries(log_level: int = logging.WARNING) -> None:
  """TFDS progress bars and Orbax/absl INFO lines drown a command's own output; an explicit
  --verbosity wins."""
  tfds = sys.modules.get("tensorflow_datasets")  # imported by the commands that read data
  if tfds is not None:
    tfds.disable_progress_bar()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(log_level)
