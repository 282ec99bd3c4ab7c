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

from mmjax.models import coca, flava, two_tower


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  title: str
  module: type[nn.Module]
  config_class: type  # a frozen config.ModelConfig subclass with `from_config(config)`
  parts: dict[str, tuple[str, ...]]  # parameter groups -> top-level module names
  paper_total_parts: tuple[str, ...]  # the groups the paper's parameter total counts
  forward_flops: Callable[[ml_collections.ConfigDict], dict[str, int]]  # per example, per part
  captions: bool  # has a captioning decoder


MODELS = {
    "coca": ModelEntry("CoCa", coca.CoCa, coca.CoCaConfig, coca.PARAMETER_PARTS,
                       coca.PAPER_TOTAL_PARTS, coca.forward_flops, captions=True),
    "flava": ModelEntry("FLAVA", flava.Flava, flava.FlavaConfig, flava.PARAMETER_PARTS,
                        flava.PAPER_TOTAL_PARTS, flava.forward_flops, captions=False),
    "two_tower": ModelEntry("Two-tower (CLIP / SigLIP)", two_tower.TwoTower,
                            two_tower.TwoTowerConfig, two_tower.PARAMETER_PARTS,
                            two_tower.PAPER_TOTAL_PARTS, two_tower.forward_flops,
                            captions=False),
}


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  entry = MODELS[config.model.name]
  return entry.module(entry.config_class.from_config(config))
