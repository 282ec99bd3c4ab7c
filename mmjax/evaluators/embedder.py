"""Embeds images and texts in fixed-size batches sharded over the mesh's batch axes."""
import concurrent.futures
import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mmjax import runtime, sharding, writers


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
    self.task = ""  # what runs now (`reporting`), named in the progress lines

  @contextlib.contextmanager
  def reporting(self, task: str) -> Iterator[None]:
    """Progress lines of the work inside name `task` (e.g. an evaluator's metric name):
    `<task> images: 512/4000 (13%), 51.2/s, ETA 1m08s`, for work that runs past 10 s."""
    previous, self.task = self.task, task
    try:
      yield
    finally:
      self.task = previous

  @classmethod
  def for_runtime(cls, rt: runtime.Runtime, batch_size: int | None = None) -> "Embedder":
    """The embedder of a run: its model and mesh, batches of `batch_size` (default the
    config's eval_batch_size)."""
    return cls(rt.model, rt.mesh, rt.config.mesh.rules,
               rt.config.eval_batch_size if batch_size is None else batch_size)

  def lower_images(self, params: Any, images: Any) -> jax.stages.Lowered:
    """The image program `images` runs, lowered for (abstract) params and one batch
    [batch_size, H, W, 3] (what `mmjax.aot` compiles)."""
    return self._image.lower(params, images)

  def lower_texts(self, params: Any, tokens: Any, text_type: Any) -> jax.stages.Lowered:
    """The text program `texts` runs, lowered for one batch: tokens [batch_size, L],
    text_type [batch_size]."""
    return self._text.lower(params, tokens, text_type)

  def images(self, params: Any, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> L2-normalised embeddings [N, E] (host)."""
    return self._normalized(lambda x: self._image(params, x[0]), images, what="images")

  def texts(self, params: Any, tokens: np.ndarray, text_type: np.ndarray) -> np.ndarray:
    """tokens [N, L], text_type [N] -> L2-normalised embeddings [N, E] (host)."""
    return self._normalized(lambda x: self._text(params, x[0], x[1]), tokens, text_type,
                            what="texts")

  def features(self, params: Any, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, 3] -> the model's frozen `image_features` [N, D] (host, float64,
    not normalised): what linear probes read."""
    return self.map_batches(lambda x: self._features(params, x[0]), images,
                            what="image features").astype(np.float64)

  def _normalized(self, fn: Callable, *arrays: np.ndarray, what: str) -> np.ndarray:
    emb = self.map_batches(fn, *arrays, what=what).astype(np.float64)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def map_batches(self, fn: Callable, *arrays: np.ndarray, what: str = "rows") -> np.ndarray:
    """fn(list of sharded [batch_size, ...] arrays) -> [batch_size, ...] over arrays [N, ...]
    in fixed-size padded batches (one compiled program); returns [N, ...] on the host.
    `what` the rows are, for the progress line of a `reporting` task."""
    batches = self.map_rows(fn, lambda rows: [a[rows] for a in arrays], len(arrays[0]),
                            progress=f"{self.task} {what}" if self.task else "", quiet_s=10)
    return np.concatenate([out for _, out in batches])

  def image_batches(self, params: Any, split: Any, *, progress: str = ""
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Streams `split` (an `mmjax.data.pipeline.EvalSplit`): yields (L2-normalised image
    embeddings [b, E] float64, labels int32 [b]) per batch, on every process; each process
    decodes only the rows its devices hold. `progress`: a name for the progress line."""
    def load(rows: np.ndarray) -> list[np.ndarray]:
      got = split.rows(rows)
      return [got["images"], got["labels"]]

    def embed(x: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
      return self._image(params, x[0]), x[1]

    for _, (emb, labels) in self.map_rows(embed, load, len(split), progress=progress):
      emb = emb.astype(np.float64)
      yield emb / np.linalg.norm(emb, axis=-1, keepdims=True), labels

  def map_rows(self, fn: Callable, load: Callable[[np.ndarray], list[np.ndarray]], n: int,
               *, progress: str = "", quiet_s: float = 0) -> Iterator[tuple[int, Any]]:
    """Yields (start, fn's outputs for rows start.. on the host) per batch of `batch_size`
    rows of a dataset of `n`, padded with the last row; `load(row indices [k])` -> list of
    arrays [k, ...] is called only for the rows this process's devices hold, and the next
    batch's rows load while this one runs. fn(list of sharded [batch_size, ...] arrays) ->
    a pytree of [batch_size, ...] arrays, gathered to every process. `progress`: a name
    for the progress line (`ProgressLine`, silent for the first `quiet_s` seconds)."""
    size = self.batch_size
    spans = sorted({(s[0].start or 0, size if s[0].stop is None else s[0].stop)
                    for s in self.sharding.addressable_devices_indices_map((size,)).values()})

    def local_rows(start: int) -> dict[tuple[int, int], list[np.ndarray]]:
      rows = np.minimum(np.arange(start, start + size), n - 1)
      return {(a, b): load(rows[a:b]) for a, b in spans}

    meter = ProgressLine(progress, n, quiet_s=quiet_s) if progress else None
    with concurrent.futures.ThreadPoolExecutor(1) as reader, jax.set_mesh(self.mesh):
      pending = reader.submit(local_rows, 0)
      for start in range(0, n, size):
        parts = pending.result()
        if start + size < n:
          pending = reader.submit(local_rows, start + size)
        out = multihost_utils.process_allgather(fn(self._assemble(parts)), tiled=True)
        valid = min(size, n - start)
        yield start, jax.tree.map(lambda x: np.asarray(x)[:valid], out)
        if meter:
          meter.update(start + valid)

  def _assemble(self, parts: dict[tuple[int, int], list[np.ndarray]]) -> list[jax.Array]:
    """This process's row spans -> global sharded [batch_size, ...] arrays."""
    first = next(iter(parts.values()))
    out = []
    for j, x in enumerate(first):
      def shard(index, j=j):
        start = index[0].start or 0
        stop = self.batch_size if index[0].stop is None else index[0].stop
        return parts[(start, stop)][j]
      out.append(jax.make_array_from_callback((self.batch_size,) + x.shape[1:],
                                              self.sharding, shard))
    return out


class ProgressLine:
  """`name: done/total (pct), rate/s, ETA` on stdout from the lead process, every 10 s and
  at the end; with `quiet_s`, only once the work has run that long (short work stays
  silent) and then at its end."""

  def __init__(self, name: str, total: int, unit: str = "images", quiet_s: float = 0):
    self.name, self.total, self.unit, self.quiet_s = name, total, unit, quiet_s
    self.start = self.last = time.monotonic()
    self.enabled = jax.process_index() == 0

  def update(self, done: int) -> None:
    now = time.monotonic()
    if not self.enabled or now - self.start < self.quiet_s:
      return
    if done < self.total and now - self.last < 10:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate else 0.0
    print(f"{self.name}: {done}/{self.total} ({100 * done / self.total:.0f}%), "
          f"{rate:.1f} {self.unit}/s, ETA {writers.format_seconds(eta)}", flush=True)
