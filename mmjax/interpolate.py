"""Weight interpolation of two checkpoints of one architecture (WiSE-FT, model soups).

  python -m mmjax.interpolate --a W1 --b W2 --alpha 0.5 --out W3 [--step_a N] [--step_b N]

Every parameter of W3 is (1 - alpha) * a + alpha * b (computed in float64, stored in the
parameters' dtype): alpha 0 is W1's model, 1 is W2's; WiSE-FT mixes a zero-shot model (a)
with its fine-tuned version (b). W1, W2 are work directories (their latest checkpoint unless
--step_a / --step_b); W3 gets step 0 holding the parameters (no optimizer state), W1's config
and tokenizer: `mmjax.evaluate --workdir W3` evaluates it, and a run that goes on from it
warm-starts (`--config.init.checkpoint=W3`). A parameter that is missing on one side or has
another shape is one line (exit status 2), and nothing is written.
"""
import os
import shutil
import tempfile

import ml_collections
import numpy as np
from absl import flags

from mmjax import checkpoint, command, errors, warm_start

FLAGS = flags.FLAGS


def interpolate(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                alpha: float) -> dict[str, np.ndarray]:
  """{path: array} of two models of one architecture -> (1 - alpha) a + alpha b per path;
  errors.UsageError naming the first parameter that differs in presence or shape."""
  for path in sorted(set(a) | set(b)):
    if path not in a or path not in b:
      raise errors.UsageError(f"parameter {path} is only in --{'a' if path in a else 'b'}: "
                              "the checkpoints are of different architectures")
    if a[path].shape != b[path].shape:
      raise errors.UsageError(f"parameter {path} has shape {a[path].shape} in --a and "
                              f"{b[path].shape} in --b: the checkpoints are of different "
                              "architectures")
  return {path: ((1.0 - alpha) * a[path].astype(np.float64)
                 + alpha * b[path].astype(np.float64)).astype(a[path].dtype) for path in a}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def write(out: str, params: dict[str, np.ndarray], source: str, step: int) -> None:
  """Step 0 of `out`: the parameters, `source`'s config and assets (tokenizer); written in a
  temporary directory beside `out` and renamed, so a failure leaves nothing."""
  reader = checkpoint.Checkpointer(source, ml_collections.ConfigDict(
      {"checkpoint": {"max_to_keep": 1, "keep_period": 0}}))
  saved = reader.saved_config(step)
  assets = reader.restore_assets(step)
  reader.close()
  config = ml_collections.ConfigDict(saved)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".interpolate-", dir=parent)
  try:
    writer = checkpoint.Checkpointer(staging, config)
    writer.save(0, {"params": unflatten(params)}, config, assets=assets)
    writer.close()
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def main(argv: list[str]) -> None:
  del argv
  if not 0.0 <= FLAGS.alpha <= 1.0:
    raise errors.UsageError(f"--alpha={FLAGS.alpha} must be in [0, 1] (0 = --a, 1 = --b)")
  if os.path.exists(FLAGS.out) and os.listdir(FLAGS.out):
    raise errors.UsageError(f"--out {FLAGS.out} exists and is not empty: choose a new "
                            "directory")
  step_a, a = warm_start.read_params(FLAGS.a, FLAGS.step_a)
  step_b, b = warm_start.read_params(FLAGS.b, FLAGS.step_b)
  params = interpolate(a, b, FLAGS.alpha)
  if os.path.exists(FLAGS.out):
    os.rmdir(FLAGS.out)
  write(FLAGS.out, params, FLAGS.a, step_a)
  print(f"Wrote {FLAGS.out}: {1 - FLAGS.alpha:g} x {FLAGS.a} (step {step_a}) + "
        f"{FLAGS.alpha:g} x {FLAGS.b} (step {step_b}), {len(params)} parameters")


if __name__ == "__main__":
  flags.DEFINE_string("a", None, "Work directory of the first model (alpha = 0).")
  flags.DEFINE_string("b", None, "Work directory of the second model (alpha = 1).")
  flags.DEFINE_float("alpha", 0.5, "Weight of --b: (1 - alpha) a + alpha b.")
  flags.DEFINE_string("out", None, "New work directory for the interpolated model.")
  flags.DEFINE_integer("step_a", None, "Checkpoint step of --a; default the latest.")
  flags.DEFINE_integer("step_b", None, "Checkpoint step of --b; default the latest.")
  # No --config: the result takes --a's config.
  command.run(main, "mmjax.interpolate", config=False, required=("a", "b", "out"))
