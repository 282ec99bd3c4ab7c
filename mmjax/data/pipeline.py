"""Grain input pipeline: topology-independent training batches and evaluation splits.

The global batch at step s is a pure function of (config.seed, s, config.batch_size,
sources, weights): example g of the run (g = s * batch_size + position) is element g of one
global, infinite `grain.MapDataset`:

  per source (sorted keys): CleanSource -> shuffle(seed_k) -> repeat()   # new order each epoch
  mix(per-source datasets, weights)                                      # deterministic interleave
  random_map(TrainTransform, seed)                                       # rng keyed by g

With a unimodal phase (U = `unimodal_steps` > 0: the objective's hook,
`mmjax.objectives.unimodal_steps`, FLAVA's `loss.unimodal_steps`), examples g < U * batch_size
come from a mix of the unimodal sources only (modality "image" or "text", their weights
renormalised), and example g >= U * batch_size is element g - U * batch_size of the mix
of all sources: the unimodal phase's batches hold no paired example its losses would not
use. (The joint mix starts each source at the beginning of its shuffled order again.)

Process p of n reads indices s*B + p*b + j (b = B // n, j < b) by random access, so the
same global batch comes out for any number of processes, and resuming at step k needs only
k (the data position of a checkpoint is the step).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from mmjax import errors
from mmjax.data import sources as sources_lib
from mmjax.data import transforms
from mmjax.data.tokenizer import Tokenizer

label_texts = sources_lib.label_texts
train_texts = sources_lib.train_texts


def derive_seed(*parts: int) -> int:
  """A 32-bit seed from integers (Grain shuffle seeds must be < 2**32)."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _mix(datasets: list[grain.MapDataset], weights: list[float]) -> grain.MapDataset:
  return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


class _Phased(grain.MapDataset):
  """Element g is `first[g]` for g < `boundary`, then `second[g - boundary]` (infinite)."""

  def __init__(self, first: grain.MapDataset, second: grain.MapDataset, boundary: int):
    super().__init__([first, second])
    self._first, self._second, self._boundary = first, second, boundary

  def __len__(self) -> int:
    return len(self._second)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index < self._boundary:
      return self._first[index]
    return self._second[index - self._boundary]


def global_train_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                         train_sources: sources_lib.TrainSources | None = None,
                         unimodal_steps: int = 0) -> grain.MapDataset:
  """The infinite MapDataset whose element g is global training example g (see module doc);
  `unimodal_steps`: the unimodal phase's steps (`mmjax.objectives.unimodal_steps`)."""
  ts = train_sources or sources_lib.open_train_sources(config)
  per_source = []
  for i, src in enumerate(ts.sources):
    # Shuffle derives seed + epoch per epoch, so repeat() yields a fresh order each epoch.
    per_source.append(grain.MapDataset.source(src).shuffle(seed=derive_seed(config.seed, 1, i))
                      .repeat())
  ds = _mix(per_source, ts.weights)
  kinds = [config.data.sources[k].kind for k in ts.keys]
  modalities = transforms.source_modalities(config, ts.keys)
  if unimodal_steps > 0:
    unimodal = [i for i, m in enumerate(modalities) if m != "paired"]
    if not unimodal:
      raise errors.UsageError(
          f"a unimodal phase of {unimodal_steps} steps needs a source with modality 'image' "
          "or 'text' in data.sources")
    first = _mix([per_source[i] for i in unimodal], [ts.weights[i] for i in unimodal])
    ds = _Phased(first, ds, unimodal_steps * int(config.batch_size))
  return ds.random_map(transforms.TrainTransform(config, tokenizer, kinds, modalities),
                       seed=derive_seed(config.seed, 2))


class _LocalToGlobal(grain.transforms.Map):
  """Local example position t of process p (from start_step) -> global example index."""

  def __init__(self, start_step: int, global_batch: int, local_batch: int, process_index: int):
    self.start, self.B, self.b, self.p = start_step, global_batch, local_batch, process_index

  def map(self, t: int) -> int:
    step, j = divmod(int(t), self.b)
    return (self.start + step) * self.B + self.p * self.b + j


class _Lookup(grain.transforms.Map):
  """Global index -> example, by random access into the global dataset."""

  def __init__(self, ds: grain.MapDataset):
    self.ds = ds

  def map(self, g: int) -> dict[str, np.ndarray]:
    return self.ds[g]


class TrainIterator:
  """Yields this process's slices of successive global batches as dicts of numpy arrays.

  Fields, with b = batch_size // process_count:
    image uint8 [b, H, W, 3] (pixels; the model maps them to [-1, 1] on the device,
    `mmjax.models.vit.normalize_images`); text int32 [b, max_text_len];
    label int32 [b] (unified class id, -1 for captions); text_type int32 [b] (0 caption,
    1 label prompt); source int32 [b] (sorted source-key index); skipped int32 [b]
    (records substituted to produce each example); has_image, has_text, paired int32 [b]
    (the source's modality, see transforms.MODALITIES). `mmjax.runtime.batch_spec` lists
    the same fields.
  The train step counts `source` and `skipped` over the global batch
  (mmjax.data.accounting): the counts and the skip guard are the whole job's.
  """

  def __init__(self, it: Any):
    self._it = it

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                        start_step: int, process_index: int, process_count: int,
                        unimodal_steps: int = 0) -> TrainIterator:
  """This process's slice of every global batch from global step `start_step` on, after a
  unimodal phase of `unimodal_steps` (`global_train_dataset`).

  The slice has b = config.batch_size // process_count examples; see `TrainIterator` for
  the fields. Concatenating the slices of processes 0..n-1 gives the same global batch
  for every n dividing config.batch_size.
  """
  B = int(config.batch_size)
  if process_count < 1 or B % process_count:
    raise ValueError(f"config.batch_size={B} must be divisible by process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  b = B // process_count
  ts = sources_lib.open_train_sources(config)
  global_ds = global_train_dataset(config, tokenizer, ts, unimodal_steps)
  # Enough local positions for any run (well inside int64 once mapped to global indices).
  n_local = (2**62 // B) * b
  ds = (grain.MapDataset.range(n_local)
        .map(_LocalToGlobal(start_step, B, b, process_index))
        .map(_Lookup(global_ds))
        .batch(b, drop_remainder=True))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if config.data.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return TrainIterator(iter(it_ds))


class EvalSplit:
  """The first `num_examples` examples of the dataset that evaluator `config.evals[key]`
  names (its dataset, `split_key` split, image_key and, if it has them, label_key,
  class_names and text_key), read on demand: `rows(indices)` decodes only those records,
  so an evaluator can stream a split of any size through a bounded amount of host memory.

  class_names: list[str] (resolved by `classnames.resolve_class_names`; WordNet ids are
  refused `for_prompts` unless data.allow_wordnet_ids), or None without a label_key.
  len() = min(num_examples, split size). Bad records are substituted as in training.
  """

  def __init__(self, config: ml_collections.ConfigDict, key: str, *, num_examples: int,
               split_key: str = "split", for_prompts: bool = False):
    e = config.evals[key]
    self.label_key = e.label_key if "label_key" in e else ""
    self.text_key = e.text_key if "text_key" in e else ""
    prefix = f"evals.{key}"
    keys = sources_lib.ConfigKeys(
        name=f"{prefix}.dataset", split=f"{prefix}.{split_key}",
        image_key=f"{prefix}.image_key", label_key=f"{prefix}.label_key",
        text_key=f"{prefix}.text_key", class_names=f"{prefix}.class_names")
    opened = sources_lib.open_source(
        e.dataset, e[split_key], config.data_dir, image_key=e.image_key,
        label_key=self.label_key, text_key=self.text_key,
        class_names=e.class_names if self.label_key else "",
        refuse_wordnet_ids=for_prompts and not config.data.allow_wordnet_ids, keys=keys)
    kind = "label" if self.label_key else ("caption" if self.text_key else "image")
    self.source = sources_lib.CleanSource(
        opened, key=f"{e.dataset}:{e[split_key]}", source_index=0, kind=kind,
        image_key=e.image_key, label_key=self.label_key, text_key=self.text_key)
    self.class_names = list(opened.class_names) if self.label_key else None
    self.dataset_class_names = (list(sources_lib.field(
        opened.data_source.dataset_info.features, self.label_key).names)
        if self.label_key and hasattr(opened.data_source, "dataset_info") else None)
    self.image_size = int(config.data.image_size)
    self._len = min(int(num_examples), len(self.source))

  def __len__(self) -> int:
    return self._len

  def rows(self, indices: Sequence[int]) -> dict[str, Any]:
    """Records `indices` (each < len(self)): images uint8 [k, S, S, 3] (resize + centre
    crop to config.data.image_size; pixels, as in training batches), labels int32 [k]
    (the dataset's own class ids; -1 without a label_key), texts list[list[str]] (all
    non-blank captions per image; [class name] for labels)."""
    size = self.image_size
    images = np.empty((len(indices), size, size, 3), np.uint8)
    labels, texts = np.empty((len(indices),), np.int32), []
    for j, i in enumerate(indices):
      rec = self.source[int(i)]
      images[j] = transforms.center_crop_resize(rec["image"], size)
      labels[j] = rec["label"]
      texts.append(rec["texts"])
    return {"images": images, "labels": labels, "texts": texts}


def load_eval_split(config: ml_collections.ConfigDict, key: str, *, num_examples: int,
                    split_key: str = "split", for_prompts: bool = False) -> dict[str, Any]:
  """Every example of `EvalSplit(config, key, ...)` in host memory: images uint8
  [N, S, S, 3]; with a label_key: labels int32 [N] and class_names list[str]; with a
  text_key: texts list[list[str]] (all non-blank captions per image)."""
  split = EvalSplit(config, key, num_examples=num_examples, split_key=split_key,
                    for_prompts=for_prompts)
  rows = split.rows(range(len(split)))
  out: dict[str, Any] = {"images": rows["images"]}
  if split.label_key:
    out["labels"], out["class_names"] = rows["labels"], split.class_names
  if split.text_key:
    out["texts"] = rows["texts"]
  return out
