"""Parameter counts per part and training FLOPs per example of a config's model.

  python -m mmjax.summary --config configs/coca.py:giant [--json] [--config.KEY=VALUE ...]

Parameters are counted on `jax.eval_shape(model.init, ...)`: shapes only, no memory, no
compile (giant in ~2 s), grouped by the model's `PARAMETER_PARTS` (`mmjax.models.MODELS`);
modules in no group count as `other`. `params_paper` sums the groups the paper's own
parameter total counts (CoCa's Table 1: image encoder + text decoder, 86M + 297M = 383M).

FLOPs come from each model's `forward_flops` formula (matmuls only, see
`mmjax.models.coca.forward_flops`); training = 3 x forward, except the patch embedding
(2 x: no image gradient); with model.patch_dropout the image encoder counts the kept
tokens only. `tests/test_summary.py` checks them against XLA's cost analysis.
"""

import json
import math
import sys
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import flags

from mmjax import command, errors, models, state as state_lib


def count_params(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameters per top-level module of the model, from shapes only (no memory, no compile)."""
  model = models.build_model(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               *state_lib.dummy_inputs(config)))
  params = nn.unbox(abstract["params"])
  return {name: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
          for name, tree in params.items()}


def model_flops_per_example(config: ml_collections.ConfigDict) -> int:
  """Training model FLOPs per example (`summarize`'s total, the MFU numerator)."""
  forward = models.MODELS[config.model.name].forward_flops(config)
  return sum(train_flops(forward).values())


def train_flops(forward: dict[str, int]) -> dict[str, int]:
  """3 x forward (forward, dX, dW), except the patch embedding: no image gradient."""
  return {k: (2 if k == "patch_embedding" else 3) * v for k, v in forward.items()}


def summarize(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Parameter counts and training FLOPs per example of `config` (JSON-serialisable).

  Keys: name, model, params_total, params_<part> per parameter group and params_other,
  params_paper (the groups the paper's total counts; 0 if none), params_by_module,
  flops_per_example (training, model FLOPs), flops_per_step (x batch_size), flops_by_part
  (training).
  """
  entry = models.MODELS[config.model.name]
  by_module = count_params(config)
  grouped = {part: sum(by_module.get(m, 0) for m in modules)
             for part, modules in entry.parts.items()}
  known = {m for modules in entry.parts.values() for m in modules}
  grouped["other"] = sum(v for k, v in by_module.items() if k not in known)
  flops = train_flops(entry.forward_flops(config))
  per_example = sum(flops.values())
  return {
      "name": config.name, "model": entry.title,
      "params_total": sum(by_module.values()),
      **{f"params_{part}": n for part, n in grouped.items()},
      "params_paper": sum(grouped[p] for p in entry.paper_total_parts),
      "params_by_module": by_module,
      "flops_per_example": per_example,
      "flops_per_step": per_example * config.batch_size,
      "flops_by_part": flops,
  }


def format_table(s: dict[str, Any]) -> str:
  """Human-readable table of `summarize`'s output."""
  total = s["params_total"]
  parts = [k.removeprefix("params_") for k in s
           if k.startswith("params_") and k not in ("params_total", "params_paper",
                                                    "params_by_module")]
  lines = [f"{s['model']} {s['name']}", "",
           f"{'parameters':40s} {'count':>14s} {'M':>9s} {'share':>7s}"]
  rows = [(part.replace("_", " "), s[f"params_{part}"]) for part in parts]
  rows.append(("total", total))
  if s["params_paper"]:
    rows.append(("the paper's total (its parts)", s["params_paper"]))
  for name, n in rows:
    lines.append(f"{name:40s} {n:14,d} {n / 1e6:9.2f} {100 * n / total:6.1f}%")
  lines += ["", f"{'training FLOPs per example':40s} {'GFLOP':>14s} {'share':>7s}"]
  for name, f in s["flops_by_part"].items():
    lines.append(f"{name:40s} {f / 1e9:14.2f} {100 * f / s['flops_per_example']:6.1f}%")
  lines.append(f"{'total':40s} {s['flops_per_example'] / 1e9:14.2f}")
  lines.append(f"{'per step (x batch)':40s} {s['flops_per_step'] / 1e9:14.4g}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  config = command.config()
  if config.model.name not in models.MODELS:
    raise errors.ConfigError(f"config model.name={config.model.name!r}: choose one of "
                             f"{list(models.MODELS)}")
  s = summarize(config)
  if flags.FLAGS.json:
    json.dump(s, sys.stdout, indent=1)
    sys.stdout.write("\n")
  else:
    print(format_table(s))


if __name__ == "__main__":
  # No --workdir: nothing is written. Shapes only (cpu_only): never wait for an accelerator.
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  command.run(main, "mmjax.summary", cpu_only=True)
