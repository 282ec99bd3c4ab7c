"""Tiny configs, synthetic batches and stand-in TFDS data for tests (the code paths are the
real ones)."""
import io

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from configs import shapes
from mmjax import runtime


def override(config, **overrides):
  """Unlocks, sets dotted keys ("model.dtype"), locks again; returns the same config."""
  config.unlock()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  config.lock()
  return config


def tiny_config(preset: str = "coca_unicl_prefix", **overrides):
  """configs/shapes.py:<preset>,tiny with dotted-key overrides."""
  return override(shapes.get_config(f"{preset},tiny"), **overrides)


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch in the pipeline's format with duplicated labels, captions and padding."""
  rng = np.random.default_rng(seed)
  b, length, size = config.batch_size, config.data.max_text_len, config.data.image_size
  vocab = config.model.text.vocab_size
  lengths = rng.integers(3, length + 1, size=b)
  text = np.zeros((b, length), np.int32)
  for i, n in enumerate(lengths):
    text[i, 0] = 2
    text[i, 1:n - 1] = rng.integers(4, vocab, size=n - 2)
    text[i, n - 1] = 1
  label = rng.integers(0, 4, size=b).astype(np.int32)
  label[: b // 2] = -1
  ones, zeros = np.ones(b, np.int32), np.zeros(b, np.int32)
  return dict(image=rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32), text=text,
              label=label, text_type=(label >= 0).astype(np.int32),
              source=(label >= 0).astype(np.int32),  # sorted source keys: captions, labels
              skipped=zeros, has_image=ones, has_text=ones, paired=ones)


def step_setup(config, num_devices: int):
  """The real runtime for `config` on the first `num_devices` devices, and a fresh sharded
  train state: (runtime.Runtime, state)."""
  rt = runtime.build(config, jax.devices()[:num_devices])
  with rt.activate():
    state = rt.init_state()
  return rt, state


class EncodedFakeSource:
  """TFDS's mock data source makes decoded random images (encoding them needs TensorFlow);
  mmjax reads images encoded, so this stand-in encodes its random images with Pillow."""

  def __init__(self, info, num_examples):
    self.dataset_info, self.num_examples = info, num_examples

  def __len__(self):
    return self.num_examples

  def __getitem__(self, i):
    rng = np.random.default_rng(i)
    h, w = rng.integers(16, 48, size=2)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, format="PNG")
    return {"image": buf.getvalue(),
            "label": int(rng.integers(self.dataset_info.features["label"].num_classes))}


def mock_tfds(num_examples: int):
  """`tfds.testing.mock_data` for catalog label datasets (imagenet2012, cifar10: their real
  builders and class lists), their images encoded as mmjax reads them."""
  def data_source(builder, split, decoders=None, **kwargs):
    del split, kwargs
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)  # mmjax decodes itself
    return EncodedFakeSource(builder.info, num_examples)
  return tfds.testing.mock_data(num_examples=num_examples, as_data_source_fn=data_source)
