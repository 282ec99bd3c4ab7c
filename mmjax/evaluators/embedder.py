"""Embeds images and texts in fixed-size batches sharded over the mesh's batch axes."""
from collections.abc import Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mmjax import sharding


class Embedder:
  """Runs the model's encoders over host arrays: one compiled program per encoder, batches
  of `batch_size` rows (rounded up to the batch-parallel size), padded at the end.

  Every process holds the same evaluation arrays; results are gathered to every process."""

  def __init__(self, model: nn.Module, mesh: Mesh, rules: Sequence, batch_size: int):
    self.model = model  # generative evaluators build their own jitted functions from it
    self.mesh = mesh
    self.sharding = sharding.batch_sharding(mesh, rules)
    parallel = sharding.batch_parallel_size(mesh, rules)
    self.batch_size = -(-batch_size // parallel) * parallel
    self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image")[0])
    self._text = jax.jit(lambda p, t, tt: model.apply({"params": p}, t, tt,
                                                      method="encode_text"))
    self._features = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                      method="image_features"))

  def images(self, params: Any, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> L2-normalised embeddings [N, E] (host)."""
    return self._normalized(lambda x: self._image(params, x[0]), images)

  def texts(self, params: Any, tokens: np.ndarray, text_type: np.ndarray) -> np.ndarray:
    """tokens [N, L], text_type [N] -> L2-normalised embeddings [N, E] (host)."""
    return self._normalized(lambda x: self._text(params, x[0], x[1]), tokens, text_type)

  def features(self, params: Any, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> the model's frozen `image_features` [N, D] (host, float64,
    not normalised): what linear probes read."""
    return self.map_batches(lambda x: self._features(params, x[0]), images).astype(np.float64)

  def _normalized(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    emb = self.map_batches(fn, *arrays).astype(np.float64)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def map_batches(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    """fn(list of sharded [batch_size, ...] arrays) -> [batch_size, ...] over arrays [N, ...]
    in fixed-size padded batches (one compiled program); returns [N, ...] on the host."""
    n, out = len(arrays[0]), []
    with jax.set_mesh(self.mesh):
      for start in range(0, n, self.batch_size):
        chunk = [_pad_to(a[start:start + self.batch_size], self.batch_size) for a in arrays]
        result = multihost_utils.process_allgather(fn([self._shard(c) for c in chunk]),
                                                   tiled=True)
        out.append(np.asarray(result)[:min(self.batch_size, n - start)])
    return np.concatenate(out)

  def _shard(self, x: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(x.shape, self.sharding, lambda index: x[index])


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x
