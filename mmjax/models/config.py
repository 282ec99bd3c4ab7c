"""Model configs: frozen dataclasses (Flax hashes them) that mirror the schema's `model.*`
section one to one (configs/schema.py documents every key).

A model's config class has one field per key of its `model` section, with the key's name;
a nested section (`model.vision`, `model.text`, ...) is a nested dataclass. `from_section`
reads them by name, so there is no translation table: `config.model.vision.width` is
`CoCaConfig.vision.width`. Fields from outside `model` are passed explicitly
(`max_text_len` from `data`, FLAVA's `mim_outputs` from `loss`).

`Stack` is the one bundle of how every transformer layer computes (activation, scan, remat,
dtypes, norm epsilon, attention implementation): `ModelConfig.stack` builds it from the
top-level `model.*` keys of those names, and stacks, blocks and encoders take it whole
(`mmjax.models.layers`).
"""
import dataclasses
import typing
from typing import Any

import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class Stack:
  """How every transformer layer computes; the fields are `model.<name>` keys. Strings name
  dtypes ("bfloat16"); they are stored as `jnp.dtype`s."""
  activation: str = "gelu"  # gelu (exact) | quick_gelu
  dtype: Any = "float32"  # activations and matmuls
  param_dtype: Any = "float32"
  scan_layers: bool = True  # one compiled layer per stack (nn.scan) instead of unrolled
  remat_policy: str = "none"  # "none" or a name in layers.REMAT_POLICIES
  norm_eps: float = 1e-6  # every LayerNorm's epsilon
  attention_impl: str = "xla"  # one of layers.ATTENTION_IMPLEMENTATIONS

  def __post_init__(self):
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

  @property
  def dtypes(self) -> dict[str, Any]:
    """dtype and param_dtype as keyword arguments (Dense, LayerNorm, Embed, heads)."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


STACK_KEYS = tuple(f.name for f in dataclasses.fields(Stack))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The `model.*` keys every model has (schema `_common_model`), plus `max_text_len`."""
  name: str
  image_size: int  # tied to data.image_size
  patch_size: int
  embed_dim: int  # the shared image-text embedding
  logit_scale_init: float
  logit_scale_max: float
  activation: str
  dtype: str
  param_dtype: str
  scan_layers: bool
  remat_policy: str
  norm_eps: float
  attention_impl: str
  max_text_len: int  # data.max_text_len: tokens per example incl. BOS/EOS

  @property
  def stack(self) -> Stack:
    return Stack(**{key: getattr(self, key) for key in STACK_KEYS})

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """`model.vision`: the ViT's shape."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """A transformer encoder's shape (FLAVA's `model.text`, `model.multimodal`)."""
  width: int
  num_layers: int
  mlp_dim: int
  num_heads: int


def from_section(cls: type, section: ml_collections.ConfigDict, **given: Any) -> Any:
  """`cls` with every field read from the key of its name in `section` (a dataclass-typed
  field from the nested section), except the fields `given`. A key of `section` that is no
  field of `cls` is an error: the config class must mirror its schema section."""
  names = {f.name for f in dataclasses.fields(cls)}
  unread = set(section.keys()) - names
  if unread:
    raise TypeError(f"{cls.__name__} has no field for the config keys {sorted(unread)}: "
                    "add them (model configs mirror configs/schema.py)")
  types = typing.get_type_hints(cls)
  values = dict(given)
  for name in names - set(given):
    value = section[name]
    if dataclasses.is_dataclass(types[name]):
      value = from_section(types[name], value)
    values[name] = value
  return cls(**values)


def kwargs(section: Any) -> dict[str, Any]:
  """A config dataclass's fields as keyword arguments (not recursive): a module whose
  attributes are named like the section's keys takes `**kwargs(c.vision)`."""
  return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
