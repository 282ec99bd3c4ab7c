"""Weights in: open_clip state dicts and Hugging Face CLIP / SigLIP folders -> an mmjax
checkpoint (`python -m mmjax.convert`).

  python -m mmjax.convert --from openclip --checkpoint open_clip_model.safetensors \
      --config configs/pretrained.py:openai_vit_b32 --out /tmp/clip_b32
  python -m mmjax.convert --from openclip --checkpoint coca.safetensors \
      --config configs/openclip.py:coca_vit_b32 --out /tmp/coca_b32
  python -m mmjax.convert --from hf --checkpoint ./siglip-base-patch16-224 --out /tmp/siglip

`--from openclip`: a state dict (.safetensors read without torch; .pt/.bin/.pth with torch's
weights-only loader) of open_clip's CLIP (configs/pretrained.py) or CoCa
(configs/openclip.py); `--config` says which. `--from hf`: a transformers `CLIPModel` /
`SiglipModel` folder (config.json + model.safetensors or pytorch_model.bin); without
`--config` the architecture is config.json's (configs/pretrained.py:hf=<folder>). SigLIP's
tokenizer (spiece.model) is copied to `<out>/tokenizer/`; CLIP uses OpenAI's BPE.

Writes `<out>/checkpoints/0` (params + a fresh optimizer state; `mmjax.evaluate`,
`mmjax.train` and `mmjax.checkpoint` restore it) through a temporary folder renamed at the
end, and prints the `--config` to use with it. A mistake is one line, exit status 2, and
leaves nothing at `--out`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np

from configs import pretrained
from mmjax import checkpoint, cli, errors
from mmjax.convert import files, openclip, two_tower

SOURCES = ("openclip", "hf")


def import_weights(source: str, checkpoint_path: str, config: ml_collections.ConfigDict | None,
                   out: str) -> tuple[ml_collections.ConfigDict, dict[str, float]]:
  """Converts `checkpoint_path` (format `source`) for `config` (None: from an HF folder's
  config.json) into `<out>/checkpoints/0`. Returns the config written and timings (s)."""
  t0 = time.perf_counter()
  if source not in SOURCES:
    raise errors.UsageError(f"--from={source}: unknown format; choose one of {SOURCES}")
  config_spec = None
  if source == "hf":
    folder = os.path.expanduser(checkpoint_path)
    weights = files.hf_weights_file(folder)
    if config is None:
      config_spec = f"configs/pretrained.py:hf={folder}"
      try:
        config = pretrained.get_config(f"hf={folder}")
      except ValueError as e:
        raise errors.UsageError(str(e)) from None
    _check_hf_type(folder, config)
  else:
    weights = os.path.expanduser(checkpoint_path)
    if config is None:
      raise errors.UsageError("--from openclip needs --config: configs/pretrained.py:<preset> "
                              "for CLIP, configs/openclip.py:<variant> for CoCa")
  cli.validate(config)
  state_dict = files.load_state_dict(weights)
  t1 = time.perf_counter()
  params = _convert(state_dict, config, source, weights)
  del state_dict
  try:
    openclip.check_params(params, config)
  except checkpoint.CheckpointMismatchError as e:
    raise errors.UsageError(f"--checkpoint={checkpoint_path} does not fit the config: "
                            f"{errors.one_line(e)}; pick the matching --config") from None
  t2 = time.perf_counter()
  final = os.path.abspath(os.path.expanduser(out))
  with files.staged_output(final) as staging:
    if config.data.tokenizer.kind == "siglip":
      config = _copy_siglip_tokenizer(config, weights, staging, final)
    # The tokenizer travels inside the checkpoint too (its assets), read from the copy.
    assets = openclip.tokenizer_assets(_with_tokenizer_path(config, staging, final))
    openclip.write_checkpoint(params, config, staging, assets)
  t3 = time.perf_counter()
  if config_spec:
    print(f"config: --config={config_spec}" + (
        f" --config.data.tokenizer.path={config.data.tokenizer.path}"
        if config.data.tokenizer.kind == "siglip" else ""))
  return config, {"load_s": t1 - t0, "convert_s": t2 - t1, "write_s": t3 - t2,
                  "total_s": t3 - t0}


def _convert(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
             source: str, weights: str) -> dict[str, Any]:
  name = config.model.name
  looks_coca = any(k.startswith("text_decoder.") for k in state_dict)
  try:
    if name == "coca":
      if source != "openclip":
        raise ValueError("CoCa weights come from open_clip only: use --from openclip")
      if not looks_coca:
        raise ValueError("not an open_clip CoCa state dict (no text_decoder.* entries): a "
                         "CLIP checkpoint? Use --config configs/pretrained.py:<preset>")
      return openclip.convert_state_dict(state_dict, config)
    if name == "two_tower":
      if looks_coca:
        raise ValueError("an open_clip CoCa state dict (text_decoder.* entries): use "
                         "--config configs/openclip.py:<variant>")
      sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
      return two_tower.import_state_dict(sd, config, source, weights)
  except ValueError as e:
    raise errors.UsageError(f"--checkpoint={weights}: {e}") from None
  raise errors.UsageError(f"config model.name={name!r}: mmjax.convert reads two_tower "
                          "(configs/pretrained.py) and coca (configs/openclip.py) models")


def _check_hf_type(folder: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(folder, "config.json")) as f:
    kind = json.load(f).get("model_type")
  want = two_tower.hf_model_type(config) if config.model.name == "two_tower" else None
  if kind != want:
    raise errors.UsageError(f"--checkpoint={folder}: a {kind!r} folder, but --config "
                            f"describes {want or config.model.name!r}: drop --config to read "
                            "the architecture from config.json, or pick the matching preset")


def _copy_siglip_tokenizer(config: ml_collections.ConfigDict, weights: str, staging: str,
                           final: str) -> ml_collections.ConfigDict:
  """SigLIP's spiece.model from the checkpoint folder (or data.tokenizer.path) into
  `<out>/tokenizer/`; the returned config points there."""
  source = (os.path.expanduser(config.data.tokenizer.path)
            or os.path.join(os.path.dirname(weights), "spiece.model"))
  if not os.path.exists(source):
    raise errors.UsageError(f"no SigLIP tokenizer at {source}: put the model's spiece.model "
                            "next to its weights or pass --config.data.tokenizer.path")
  os.makedirs(os.path.join(staging, "tokenizer"))
  shutil.copyfile(source, os.path.join(staging, "tokenizer", "spiece.model"))
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy, references resolved
  config.data.tokenizer.path = os.path.join(final, "tokenizer", "spiece.model")
  config.lock()
  return config


def _with_tokenizer_path(config: ml_collections.ConfigDict, staging: str,
                         final: str) -> ml_collections.ConfigDict:
  """`config` whose tokenizer path under `final` is read from `staging` (not renamed yet)."""
  path = config.data.tokenizer.path
  if not path.startswith(final + os.sep):
    return config
  staged = ml_collections.ConfigDict(config.to_dict())
  staged.data.tokenizer.path = os.path.join(staging, os.path.relpath(path, final))
  return staged


def main(argv: list[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  _, timings = import_weights(f["from"].value, f.checkpoint, f.config, f.out)
  print(f"wrote {os.path.join(os.path.abspath(os.path.expanduser(f.out)), 'checkpoints', '0')}"
        " (" + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ")")


CONFIG_HELP = ("configs/pretrained.py:<preset> or configs/openclip.py:<variant> with "
               "--config.KEY overrides; --from hf reads config.json without it.")


def define_flags() -> None:
  """The command's own flags; --config (optional, CONFIG_HELP) comes with the command
  skeleton (mmjax.command.run in mmjax/convert/__main__.py)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_enum("from", None, list(SOURCES), "Source format: openclip (a state dict "
                    "file) or hf (a transformers CLIPModel / SiglipModel folder).")
  flags.DEFINE_string("checkpoint", None, "State dict file (--from openclip) or model "
                      "folder (--from hf).")
  flags.DEFINE_string("out", None, "Output workdir (gets checkpoints/0); must not exist.")
