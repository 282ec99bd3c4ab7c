"""Evaluates a checkpoint with the evaluators its config lists (mmjax.evaluators).

  python -m mmjax.evaluate --config configs/shapes.py --workdir /tmp/mmjax_shapes [--step N]
      [--ema]

--ema (or config eval_use_ema) evaluates the parameters' moving average that training kept
with optimizer.ema_decay instead of the parameters.

Restores parameters only (no optimizer state) onto whatever devices exist, runs the
evaluators, writes `<workdir>/eval/step_<N>.json`, a picture grid of sample captions and
prompt classes `<workdir>/eval/samples_<N>.png` (also to TensorBoard) and prints a table.
The trainer runs the same evaluators every `eval_every_steps`.

  python -m mmjax.evaluate --config C --workdir W --suite imagenet|clip_benchmark|... [--strict]

runs a benchmark suite instead (`mmjax.evaluators.suite`; `--suite list` lists its datasets).
"""
import json

import jax
import ml_collections
from etils import epath  # local or gs://

from mmjax import checkpoint, cli, command, errors, evaluators, runtime, writers
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evaluators import grid
from mmjax.evaluators import suite as suite_lib


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None,
                        ema: bool = False) -> tuple[int, dict[str, float]]:
  """Restores params only (their EMA with `ema` or config eval_use_ema) onto the devices
  present and runs the configured evaluators."""
  step = checkpoint.existing_step(workdir, step)  # before anything is created in workdir
  rt = runtime.build(config, params_only=True)
  checkpointer = checkpoint.Checkpointer(workdir, config)
  # The tokenizer the checkpoint was trained with (older checkpoints: from data_dir).
  tokenizer = tokenizer_lib.get_tokenizer(config, checkpointer.restore_assets(step))
  writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0, config=config)
  with rt.activate():
    params = checkpointer.restore_params(step, rt.abstract_state,
                                         ema=ema or config.eval_use_ema)
    evals = evaluators.build_evaluators(config, tokenizer)
    embedder = evaluators.Embedder.for_runtime(rt)
    results = grid.evaluate_and_record(evals, evals, embedder, params, writer, workdir, step)
  checkpointer.close()
  if writer.enabled:
    out = epath.Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_{step}.json").write_text(json.dumps({"step": step, **results}, indent=1))
  writer.close()
  return step, results


def evaluate_suite(config: ml_collections.ConfigDict, workdir: str, suite: str,
                   step: int | None = None, strict: bool = False,
                   ema: bool = False) -> list[dict]:
  """Restores params only (their EMA with `ema` or config eval_use_ema) and runs benchmark
  suite `suite` (mmjax.evaluators.suite)."""
  suite_lib.suite_members(suite)  # an unknown name fails before anything is restored
  step = checkpoint.existing_step(workdir, step)
  rt = runtime.build(config, params_only=True)
  tokenizer = tokenizer_lib.get_tokenizer(config)
  checkpointer = checkpoint.Checkpointer(workdir, config)
  with rt.activate():
    params = checkpointer.restore_params(step, rt.abstract_state,
                                         ema=ema or config.eval_use_ema)
    embedder = evaluators.Embedder.for_runtime(rt)
    records = suite_lib.run_suite(config, workdir, step, suite, embedder, params, tokenizer,
                                  strict=strict)
  checkpointer.close()
  return records


def main(argv: list[str]) -> None:
  del argv
  config = cli.validated_config()
  cli.enable_compilation_cache(config)
  if cli.FLAGS.suite == "list":
    print(suite_lib.list_datasets(config))
    return
  if not cli.FLAGS.workdir:
    raise errors.UsageError("flag --workdir must name the work directory holding the "
                            "checkpoints to evaluate (only --suite list needs none)")
  try:
    if cli.FLAGS.suite:
      evaluate_suite(config, cli.FLAGS.workdir, cli.FLAGS.suite, cli.FLAGS.step,
                     cli.FLAGS.strict, ema=cli.FLAGS.ema)
      return
    step, results = evaluate_checkpoint(config, cli.FLAGS.workdir, cli.FLAGS.step,
                                        ema=cli.FLAGS.ema)
  except checkpoint.CheckpointMismatchError as e:  # here a mistake in the command line
    raise errors.UsageError(f"{e}: pass the --config (and overrides) the checkpoint was "
                            "trained with") from None
  print(f"step {step}\n{evaluators.format_results(results)}")


if __name__ == "__main__":
  cli.define_flags(step=True, workdir_required=False)  # `--suite list` needs none
  cli.flags.DEFINE_string("suite", None, "A benchmark suite to run instead of the config's "
                          "evaluators (imagenet, clip_benchmark, retrieval, captioning), or "
                          "`list` to list its datasets.")
  cli.flags.DEFINE_bool("strict", False, "--suite: a dataset missing from data_dir stops "
                        "the suite instead of being skipped.")
  cli.flags.DEFINE_bool("ema", False, "Evaluate the parameters' moving average "
                        "(optimizer.ema_decay) instead of the parameters.")
  # A usage error is one line, exit status 2; a checkpoint that does not match the config,
  # one line, exit status 1.
  command.run(main, "mmjax.evaluate", failures=(checkpoint.CheckpointMismatchError,))
