"""A trained checkpoint as a Python object: `mmjax.load`.

  import mmjax
  model = mmjax.load("/tmp/mmjax_shapes")             # a workdir; its latest step
  emb = model.encode_image(["cat.jpg", pil_image])    # [2, E] float32, L2-normalised
  probs = model.classify(images, ["cat", "dog"])      # [N, 2], prompts as zero-shot builds them
  model.caption(images)                               # CoCa: a list of strings

Parameters only (no optimizer state) are restored onto whatever devices exist, with the
checkpoint's own config (overrides allowed) and the tokenizer stored with it. Images are
prepared exactly as the evaluators prepare theirs (centre crop, bilinear resize to
data.image_size, `mmjax.data.pipeline.load_eval_split`). Calls of any length reuse a few
compiled programs: inputs are padded to one of `BATCH_SIZES` (larger inputs run in chunks
of the largest), rounded up to the mesh's batch-parallel size.
docs/api.md walks through it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from mmjax import checkpoint, decode, errors, evaluators, models, runtime, sharding, vocabulary
from mmjax.data import classnames, images as images_lib, transforms
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evaluators import zeroshot

BATCH_SIZES = (1, 8, 64)  # padded batch sizes; longer inputs run in chunks of the largest

ImageLike = Any  # a PIL image, a file path (local or gs://), or a uint8 array [H, W(, C)]
Images = ImageLike | Sequence[ImageLike] | np.ndarray  # or a uint8 batch [N, H, W, C]


def load(path: str, *, step: int | None = None,
         config: ml_collections.ConfigDict | dict[str, Any] | None = None,
         ema: bool = False, devices: Sequence[Any] | None = None) -> "Model":
  """The model of a checkpoint, ready to embed, classify and caption.

  path: a workdir (`mmjax.train --workdir`, `mmjax.convert.openclip --out`), its
    `checkpoints` folder, or one step's folder `<workdir>/checkpoints/<step>`.
  step: the checkpoint step (default: the one `path` names, else the latest).
  config: a whole config to use instead of the checkpoint's, or {dotted key: value}
    overrides of the checkpoint's (e.g. {"mesh.shape": (1, -1, 1)}). When the stored
    mesh.shape does not fit the devices present, the mesh is data-parallel over all of them;
    a mesh.shape without -1 of fewer devices than there are uses the first ones.
  ema: the exponential moving average of the parameters (a run with optimizer.ema_decay).
  devices: the devices to run on (default: every device of every process; a multi-process
    job then calls each method in every process with the same inputs).
  """
  workdir, step = _workdir_and_step(os.fspath(path), step)
  step = checkpoint.existing_step(workdir, step)
  if not isinstance(config, ml_collections.ConfigDict):
    config = _stored_config(stored_config(workdir, step), config or {},
                            len(jax.devices() if devices is None else devices))
  rt = runtime.build(config, _devices(config, devices), params_only=True)
  checkpointer = checkpoint.Checkpointer(workdir, config)
  try:
    with rt.activate():
      params = checkpointer.restore_params(step, rt.abstract_state, ema=ema)
    assets = checkpointer.restore_assets(step)
  except checkpoint.CheckpointMismatchError as e:
    raise errors.UsageError(str(e)) from None
  finally:
    checkpointer.close()
  return Model(rt, params, tokenizer_lib.get_tokenizer(config, assets), step)


def stored_config(path: str, step: int | None = None) -> dict:
  """The config stored with a checkpoint (`load`'s `path` and `step`), as a dict."""
  workdir, step = _workdir_and_step(os.fspath(path), step)
  step = checkpoint.existing_step(workdir, step)
  probe = checkpoint.Checkpointer(workdir, _MINIMAL_CHECKPOINT_CONFIG)
  try:
    return probe.saved_config(step)
  finally:
    probe.close()


class Model:
  """A restored model (`load`). Attributes: config, step, params, tokenizer, mesh, module
  (the Flax module).

  Every method taking `images` accepts one image or a sequence of them: PIL images, file
  paths, uint8 arrays [H, W], [H, W, 3] or [H, W, 4], or a uint8 batch [N, H, W, 3].
  """

  def __init__(self, rt: runtime.Runtime, params: Any, tokenizer: tokenizer_lib.Tokenizer,
               step: int):
    self.config, self.step, self.params, self.tokenizer = rt.config, step, params, tokenizer
    self.mesh, self.module = rt.mesh, rt.model
    self.entry = models.MODELS[self.config.model.name]
    parallel = sharding.batch_parallel_size(rt.mesh, self.config.mesh.rules)
    self.batch_sizes = tuple(sorted({-(-b // parallel) * parallel for b in BATCH_SIZES}))
    self._embedders: dict[int, evaluators.Embedder] = {}
    self._captioners: dict[decode.DecodeConfig, Any] = {}
    self._logit_scale = float(jax.jit(lambda p: rt.model.apply(
        {"params": p}, method="logit_scale"))(params))

  def __repr__(self) -> str:
    return (f"<mmjax {self.entry.title} step {self.step}, image_size "
            f"{self.config.data.image_size}, {len(self.mesh.devices.flat)} device(s)>")

  def preprocess(self, images: Images) -> np.ndarray:
    """-> uint8 [N, S, S, 3] (S = data.image_size): the evaluators' transform."""
    size = int(self.config.data.image_size)
    return np.stack([transforms.center_crop_resize(rgb, size) for rgb in to_rgb(images)])

  def encode_image(self, images: Images) -> np.ndarray:
    """-> float32 [N, E], L2-normalised image embeddings."""
    pixels = self.preprocess(images)
    return self._embedder(len(pixels)).images(self.params, pixels).astype(np.float32)

  def encode_text(self, texts: str | Sequence[str], prefix: str = "caption") -> np.ndarray:
    """-> float32 [N, E], L2-normalised text embeddings. prefix: the kind of text
    ('caption', or 'label' for class prompts), which prefix-conditioned models embed
    differently (`vocabulary.TEXT_TYPES`)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if prefix not in vocabulary.TEXT_TYPES:
      raise ValueError(f"prefix={prefix!r}: choose one of {list(vocabulary.TEXT_TYPES)}")
    tokens = self.tokenizer.encode(texts, int(self.config.data.max_text_len))
    text_type = np.full(len(texts), vocabulary.TEXT_TYPES[prefix], np.int32)
    return self._embedder(len(texts)).texts(self.params, tokens, text_type).astype(np.float32)

  def similarity(self, images: Images, texts: str | Sequence[str],
                 prefix: str = "caption") -> np.ndarray:
    """-> float32 [N images, M texts]: cosine similarities of the embeddings."""
    return self.encode_image(images) @ self.encode_text(texts, prefix).T

  def classify(self, images: Images, class_names: Sequence[str],
               templates: Sequence[str] | None = None, prefix: str | None = None) -> np.ndarray:
    """-> float32 [N, len(class_names)]: probabilities over the names (softmax of the
    model's logit scale times cosine similarity), with each class embedded as the zero-shot
    evaluator does (every template filled with its name, embeddings averaged).

    templates: strings with one '{}' (default: the config's zero-shot templates, i.e. its
    training templates unless evals.zeroshot.templates says otherwise). prefix: the text
    type of the prompts (default: evals.zeroshot.prefix, else 'caption')."""
    class_names = [class_names] if isinstance(class_names, str) else list(class_names)
    templates = self._templates(templates)
    if prefix is None:
      prefix = self.config.evals.zeroshot.prefix if "zeroshot" in self.config.evals else "caption"
    prompts = zeroshot.class_prompts(class_names, templates)
    classes = zeroshot.class_embeddings(self.encode_text(prompts, prefix), len(class_names))
    logits = self._logit_scale * (self.encode_image(images) @ classes.T.astype(np.float32))
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)

  def caption(self, images: Images, strategy: str = "beam", *, beam_size: int | None = None,
              max_new_tokens: int | None = None, length_penalty: float | None = None,
              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              seed: int = 0) -> list[str]:
    """-> one generated caption per image (`mmjax.decode`; captioning models only).
    Unset options come from the config's evals.captioning entry."""
    if not self.entry.captions:
      raise ValueError(f"caption(): model.name={self.config.model.name!r} "
                       f"({self.entry.title}) has no captioning decoder; captions need a "
                       f"captioning model ({[k for k, m in models.MODELS.items() if m.captions]})")
    defaults = (self.config.evals.captioning if "captioning" in self.config.evals else
                {"beam_size": 4, "length_penalty": 1.0,
                 "max_new_tokens": int(self.config.data.max_text_len) - 1})
    config = decode.DecodeConfig(
        strategy=strategy, beam_size=beam_size or defaults["beam_size"],
        max_new_tokens=max_new_tokens or defaults["max_new_tokens"],
        length_penalty=defaults["length_penalty"] if length_penalty is None else length_penalty,
        temperature=temperature, top_k=top_k, top_p=top_p, bos_id=self.tokenizer.bos_id,
        eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
    if config not in self._captioners:
      self._captioners[config] = decode.make_captioner(self.module, config)
    captioner, rng = self._captioners[config], jax.random.key(seed)
    pixels = self.preprocess(images)
    tokens = self._embedder(len(pixels)).map_batches(
        lambda x: captioner(self.params, x[0], rng), pixels)
    return [self.tokenizer.decode(t) for t in tokens]

  def _templates(self, templates: Sequence[str] | None) -> tuple[str, ...]:
    if templates is None:
      entry = self.config.evals.zeroshot if "zeroshot" in self.config.evals else None
      return classnames.label_templates(self.config, entry.templates if entry else "",
                                        "evals.zeroshot.templates")
    templates = [templates] if isinstance(templates, str) else list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
      raise ValueError(f"templates need exactly one '{{}}' for the class name; got "
                       f"{bad[:1] or 'none'}")
    return tuple(templates)

  def _embedder(self, n: int) -> evaluators.Embedder:
    """The embedder of the smallest batch size holding n rows (else the largest, in
    chunks): one compiled program per (encoder, batch size) for the model's lifetime."""
    size = next((b for b in self.batch_sizes if n <= b), self.batch_sizes[-1])
    if size not in self._embedders:
      self._embedders[size] = evaluators.Embedder(self.module, self.mesh,
                                                  self.config.mesh.rules, size)
    return self._embedders[size]


def to_rgb(images: Images) -> list[np.ndarray]:
  """One image or a sequence (see `Model`) -> a list of uint8 [H, W, 3] RGB arrays, decoded
  as every mmjax read path decodes (`mmjax.data.decode_image`: EXIF orientation,
  transparency onto white)."""
  if isinstance(images, np.ndarray):
    images = list(images) if images.ndim == 4 else [images]
  elif isinstance(images, (str, os.PathLike, Image.Image)):
    images = [images]
  out = []
  for i, image in enumerate(images):
    if isinstance(image, Image.Image):
      out.append(images_lib.pil_to_rgb(image))
    elif isinstance(image, (str, os.PathLike)):
      try:
        out.append(images_lib.decode_image(epath.Path(image).expanduser().read_bytes()))
      except FileNotFoundError:
        raise FileNotFoundError(f"image {i}: no such file {image}") from None
      except Exception as e:  # Pillow's many errors for a file it cannot decode
        raise ValueError(f"image {i}: cannot decode {image} ({e})") from None
    elif isinstance(image, np.ndarray):
      out.append(_array_to_rgb(image, i))
    else:
      raise TypeError(f"image {i}: expected a PIL image, a file path or a uint8 array, got "
                      f"{type(image).__name__}")
  if not out:
    raise ValueError("no images given")
  return out


def _array_to_rgb(array: np.ndarray, index: int) -> np.ndarray:
  if array.dtype != np.uint8:
    raise TypeError(f"image {index}: arrays must be uint8 pixels (0-255), got {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
    raise ValueError(f"image {index}: expected [H, W], [H, W, 3] or [H, W, 4], got shape "
                     f"{array.shape}")
  return images_lib.to_rgb(Image.fromarray(array))


# Enough config for a Checkpointer that only reads a stored config.
_MINIMAL_CHECKPOINT_CONFIG = ml_collections.ConfigDict(
    {"checkpoint": {"max_to_keep": 1, "keep_period": 0}})


def _workdir_and_step(path: str, step: int | None) -> tuple[str, int | None]:
  """`<workdir>`, `<workdir>/checkpoints` or `<workdir>/checkpoints/<step>` -> (workdir,
  step): a step folder's number is the step unless `step` says otherwise."""
  path = path.rstrip("/") or "/"
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(name) if step is None else step
  if name == "checkpoints" and not (epath.Path(path) / "checkpoints").exists():
    return parent, step
  return os.path.expanduser(path), step


def _devices(config: ml_collections.ConfigDict, devices: Sequence[Any] | None) -> list[Any]:
  shape = tuple(config.mesh.shape)
  devices = list(jax.devices() if devices is None else devices)
  return devices[:int(np.prod(shape))] if -1 not in shape else devices


def _stored_config(stored: dict, overrides: dict[str, Any],
                   num_devices: int) -> ml_collections.ConfigDict:
  """The checkpoint's config (JSON: its tuples came back as lists) with dotted overrides;
  a mesh that fits the devices present."""
  config = ml_collections.ConfigDict(_tuples(stored))
  if "mesh.shape" not in overrides:
    try:
      sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
    except ValueError:
      config.mesh.shape = (-1, 1, 1)
  try:
    config.update_from_flattened_dict(dict(overrides))
  except (KeyError, AttributeError) as e:
    raise errors.UsageError(f"config overrides {sorted(overrides)}: {e}") from None
  config.lock()
  return config


def _tuples(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value
