"""Model zoo: `MODELS[config.model.name]` says how to build a model and describe it.

Every model is a Flax module with the methods mmjax's commands call:
  __call__(images, text, text_type, ...)  training forward (the objective's inputs)
  encode_image(images) -> (embedding [B, E], caption tokens or None)
  encode_text(text, text_type) -> embedding [B, E]
  image_features(images) -> [B, D]         frozen features for linear probes
  logit_scale() -> scalar                  the contrastive temperature's inverse
and, for captioning models (`captions`), decode_prefill / decode_step (`mmjax.decode`).

Configs (`mmjax.models.config`): a model's config class is a frozen dataclass that mirrors
its `model` section in configs/schema.py key for key (nested sections are nested
dataclasses; `config.from_section` reads them by name, and refuses a key with no field).
The top-level keys activation, dtype, param_dtype, scan_layers, remat_policy,
attention_impl and norm_eps form one `config.Stack`, which every encoder, decoder, block
and stack (`layers.TransformerStack`, `vit.ViT`, ...) takes whole as its `stack`
attribute; a module's own shape attributes are named like the section's keys, so a
section is passed as `**config.kwargs(c.vision)`. A new model knob is a schema key, a
field of the same name, and the module that reads it; a new stack-wide knob is a
`Stack` field read where layers are built.
"""
import dataclasses
from typing import Callable

import flax.linen as nn
import ml_collections

from configs import schema
from mmjax.models import coca, flava, layers, two_tower

Check = Callable[[ml_collections.ConfigDict], list[str]]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  title: str
  module: type[nn.Module]
  config_class: type  # a frozen config.ModelConfig subclass with `from_config(config)`
  section: Callable[[], ml_collections.ConfigDict]  # its `model` keys (configs/schema.py)
  check: Check  # its own keys' problems, one line each (the shared ones: `check` below)
  parts: dict[str, tuple[str, ...]]  # parameter groups -> top-level module names
  paper_total_parts: tuple[str, ...]  # the groups the paper's parameter total counts
  forward_flops: Callable[[ml_collections.ConfigDict], dict[str, int]]  # per example, per part
  captions: bool  # has a captioning decoder


MODELS = {
    "coca": ModelEntry("CoCa", coca.CoCa, coca.CoCaConfig, schema.coca_model, coca.check,
                       coca.PARAMETER_PARTS, coca.PAPER_TOTAL_PARTS, coca.forward_flops,
                       captions=True),
    "flava": ModelEntry("FLAVA", flava.Flava, flava.FlavaConfig, schema.flava_model,
                        flava.check, flava.PARAMETER_PARTS, flava.PAPER_TOTAL_PARTS,
                        flava.forward_flops, captions=False),
    "two_tower": ModelEntry("Two-tower (CLIP / SigLIP)", two_tower.TwoTower,
                            two_tower.TwoTowerConfig, schema.two_tower_model, two_tower.check,
                            two_tower.PARAMETER_PARTS, two_tower.PAPER_TOTAL_PARTS,
                            two_tower.forward_flops, captions=False),
}


DTYPES = ("float32", "bfloat16", "float16")  # model.dtype and model.param_dtype


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of `config.model`, one line each naming the key: the keys every model shares
  (image and patch size, the `Stack` keys), then the model's own (`ModelEntry.check`)."""
  m = config.model
  if m.name not in MODELS:
    return [f"config model.name={m.name!r}: choose one of {list(MODELS)}"]
  problems = []
  if m.image_size % m.patch_size:
    problems.append(f"config model.image_size={m.image_size} is not divisible by "
                    f"model.patch_size={m.patch_size}")
  if m.remat_policy not in ("none", *layers.REMAT_POLICIES):
    problems.append(f"config model.remat_policy={m.remat_policy!r}: choose one of "
                    f"{['none', *layers.REMAT_POLICIES]}")
  for key in ("dtype", "param_dtype"):
    if m[key] not in DTYPES:
      problems.append(f"config model.{key}={m[key]!r}: choose one of {list(DTYPES)}")
  if m.activation not in layers.ACTIVATIONS:
    problems.append(f"config model.activation={m.activation!r}: choose one of "
                    f"{list(layers.ACTIVATIONS)}")
  if m.attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
    problems.append(f"config model.attention_impl={m.attention_impl!r}: choose one of "
                    f"{list(layers.ATTENTION_IMPLEMENTATIONS)}")
  elif m.attention_impl == "cudnn" and m.dtype not in ("bfloat16", "float16"):
    problems.append(f"config model.attention_impl='cudnn' needs model.dtype='bfloat16' (or "
                    f"'float16'), not {m.dtype!r}; or use attention_impl='xla'")
  return problems + MODELS[m.name].check(config)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The model `config.model` describes (a config `check` passed: commands validate first)."""
  entry = MODELS[config.model.name]
  return entry.module(entry.config_class.from_config(config))
