"""Evaluates a checkpoint with the evaluators its config lists (mmjax.evaluators).

  python -m mmjax.evaluate --config configs/shapes.py --workdir /tmp/mmjax_shapes [--step N]

Restores parameters only (no optimizer state) onto whatever devices exist, runs the
evaluators, writes `<workdir>/eval/step_<N>.json`, a picture grid of sample captions and
prompt classes `<workdir>/eval/samples_<N>.png` (also to TensorBoard) and prints a table.
The trainer runs the same evaluators every `eval_every_steps`.
"""
import json

import jax
import ml_collections
from etils import epath  # local or gs://

from mmjax import checkpoint, cli, errors, evaluators, runtime, writers
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evaluators import grid


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> tuple[int, dict[str, float]]:
  """Restores params only onto the devices present and runs the configured evaluators."""
  step = checkpoint.existing_step(workdir, step)  # before anything is created in workdir
  rt = runtime.build(config, params_only=True)
  checkpointer = checkpoint.Checkpointer(workdir, config)
  # The tokenizer the checkpoint was trained with (older checkpoints: from data_dir).
  tokenizer = tokenizer_lib.get_tokenizer(config, checkpointer.restore_assets(step))
  with rt.activate():
    params = checkpointer.restore_params(step, rt.abstract_state)
    evals = evaluators.build_evaluators(config, tokenizer)
    embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules,
                                   config.eval_batch_size)
    results = evaluators.run_evaluators(evals, embedder, params)
    picture = grid.sample_grid(evals, embedder, params)
  checkpointer.close()
  writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if writer.enabled:
    out = epath.Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_{step}.json").write_text(json.dumps({"step": step, **results}, indent=1))
  if picture is not None:
    grid.write_sample_grid(writer, workdir, step, picture)
  writer.close()
  return step, results


def main(argv: list[str]) -> None:
  del argv
  cli.quiet_libraries()
  config = cli.validated_config()
  cli.enable_compilation_cache(config)
  step, results = evaluate_checkpoint(config, cli.FLAGS.workdir, cli.FLAGS.step)
  print(f"step {step}\n{evaluators.format_results(results)}")


if __name__ == "__main__":
  cli.define_flags(step=True)
  errors.run(main, "mmjax.evaluate")  # a usage error is one line, exit status 2
