"""Weights out: an mmjax checkpoint -> open_clip or Hugging Face transformers.

  python -m mmjax.export --to openclip --workdir /tmp/clip_b32 --out /tmp/clip_b32_openclip
  python -m mmjax.export --to hf --workdir /tmp/siglip [--step N] [--ema] --out /tmp/siglip_hf

Reads the checkpoint's own config (no --config), and writes, through a temporary folder
renamed at the end:
  --to openclip  open_clip_model.safetensors + open_clip_config.json, which
                 `open_clip.create_model("local-dir:<out>")` loads (strict); CoCa
                 (configs/openclip.py) and CLIP two-tower models (configs/pretrained.py).
  --to hf        config.json + model.safetensors, which `CLIPModel.from_pretrained` /
                 `SiglipModel.from_pretrained` loads, and the tokenizer files
                 (CLIP: OpenAI's BPE as vocab.json + merges.txt; SigLIP: spiece.model).
--ema exports the parameters' moving average that training kept (optimizer.ema_decay)
instead of the parameters; a checkpoint without one is one line (exit status 2).
Parameters go out as float32 with the source format's names and shapes; importing the
result with `mmjax.convert` gives back the same parameters bit for bit.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmjax import checkpoint, command, errors, runtime
from mmjax.convert import files, openclip, two_tower
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.models import coca
from mmjax.tokenizers import openclip as openclip_tokenizer

TARGETS = ("openclip", "hf")


def saved_config(workdir: str, step: int) -> ml_collections.ConfigDict:
  """The config a checkpoint was written with (JSON lists back to tuples), locked."""
  path = epath.Path(workdir) / "checkpoints" / str(step) / "config"
  stored = ocp.JsonCheckpointHandler().restore(path)

  def tuples(x: Any) -> Any:
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(tuples(v) for v in x)
    return x
  config = ml_collections.ConfigDict(tuples(stored))
  config.lock()
  return config


def restore_params(workdir: str, step: int | None, ema: bool = False
                   ) -> tuple[ml_collections.ConfigDict, Any, dict[str, bytes]]:
  """(the checkpoint's config, its parameters (their EMA with `ema`) as host NumPy arrays,
  its assets)."""
  step = checkpoint.existing_step(workdir, step)
  config = saved_config(workdir, step)
  rt = runtime.build(config, jax.devices()[:1], params_only=True)
  checkpointer = checkpoint.Checkpointer(workdir, config)
  with rt.activate():
    params = checkpointer.restore_params(step, rt.abstract_state, ema=ema)
  assets = checkpointer.restore_assets(step)
  checkpointer.close()
  return config, jax.tree.map(np.asarray, jax.device_get(params)), assets


def export_weights(target: str, workdir: str, step: int | None, out: str,
                   ema: bool = False) -> list[str]:
  """Writes `out` in format `target` (from the parameters' EMA with `ema`); returns the file
  names written."""
  if target not in TARGETS:
    raise errors.UsageError(f"--to={target}: unknown format; choose one of {TARGETS}")
  config, params, assets = restore_params(workdir, step, ema)
  name = config.model.name
  if name not in ("coca", "two_tower") or (name == "coca" and target == "hf"):
    raise errors.UsageError(
        f"the checkpoint's model.name={name!r} has no {target} form: --to openclip takes coca "
        "(configs/openclip.py) and two_tower CLIP models, --to hf two_tower CLIP and SigLIP")
  with files.staged_output(out) as staging:
    try:
      if target == "openclip":
        _write_openclip(config, params, staging)
      else:
        _write_hf(config, params, tokenizer_lib.get_tokenizer(config, assets), staging)
    except ValueError as e:
      raise errors.UsageError(f"--to={target}: {errors.one_line(e)}") from None
    written = sorted(os.listdir(staging))
  return written


def _write_openclip(config: ml_collections.ConfigDict, params: Any, folder: str) -> None:
  if config.model.name == "coca":
    state_dict = openclip.export_state_dict(params, config)
    model_cfg = openclip.openclip_model_config_of(config)
    mean, std = coca.IMAGE_NORMS["clip"]
  else:
    state_dict = two_tower.export_state_dict(params, config, "openclip")
    model_cfg = two_tower.openclip_model_config(config)
    mean, std = coca.IMAGE_NORMS[config.model.image_norm] or ((0.5,) * 3, (0.5,) * 3)
  files.save_safetensors(state_dict, os.path.join(folder, "open_clip_model.safetensors"))
  preprocess = dict(image_size=config.model.image_size, mean=list(mean), std=list(std),
                    interpolation="bicubic", resize_mode="shortest")
  _write_json(os.path.join(folder, "open_clip_config.json"),
              dict(model_cfg=model_cfg, preprocess_cfg=preprocess))


def _write_hf(config: ml_collections.ConfigDict, params: Any, tokenizer: Any,
              folder: str) -> None:
  state_dict = two_tower.export_state_dict(params, config, "hf")
  files.save_safetensors(state_dict, os.path.join(folder, "model.safetensors"),
                         metadata={"format": "pt"})  # transformers reads torch tensors
  hf = two_tower.hf_config(config)
  _write_json(os.path.join(folder, "config.json"), hf)
  length = config.data.max_text_len
  if hf["model_type"] == "siglip":
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
      f.write(tokenizer.model_proto)
    _write_json(os.path.join(folder, "tokenizer_config.json"), dict(
        tokenizer_class="SiglipTokenizer", model_max_length=length, do_lower_case=True,
        eos_token="</s>", pad_token="</s>", unk_token="<unk>"))
    return
  if not isinstance(tokenizer, openclip_tokenizer.OpenClipTokenizer):
    return  # a model trained with its own SentencePiece: transformers' CLIP has no format
  start, end = "<|startoftext|>", "<|endoftext|>"  # transformers' names, the same ids
  names = {tokenizer.bos_id: start, tokenizer.eos_id: end}
  vocab = {names.get(i, token): i for token, i in tokenizer.encoder.items()}
  merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
  _write_json(os.path.join(folder, "vocab.json"), vocab)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
  _write_json(os.path.join(folder, "tokenizer_config.json"), dict(
      tokenizer_class="CLIPTokenizer", model_max_length=length, do_lower_case=True,
      bos_token=start, eos_token=end, unk_token=end, pad_token=end))


def _write_json(path: str, value: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
    f.write("\n")


def main(argv: list[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  written = export_weights(f.to, f.workdir, f.step, f.out, f.ema)
  what = " (the parameters' EMA)" if f.ema else ""
  print(f"wrote {os.path.abspath(os.path.expanduser(f.out))}{what}: {', '.join(written)}")


if __name__ == "__main__":
  from absl import flags
  flags.DEFINE_enum("to", None, list(TARGETS), "Target format: openclip or hf.")
  flags.DEFINE_string("workdir", None, "mmjax work directory with checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  flags.DEFINE_string("out", None, "Output folder; must not exist.")
  flags.DEFINE_bool("ema", False, "Export the parameters' moving average "
                    "(optimizer.ema_decay) instead of the parameters.")
  # No --config: the checkpoint's own config is read from the work directory.
  command.run(main, "mmjax.export", config=False, required=("to", "workdir", "out"))
