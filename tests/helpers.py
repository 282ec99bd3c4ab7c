"""Tiny configs and synthetic batches for tests (the code paths are the real ones)."""
import jax
import numpy as np

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
