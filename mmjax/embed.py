"""Embeddings of a folder, a TFDS split or WebDataset shards, for a nearest-neighbour index.

  python -m mmjax.embed --workdir /tmp/mmjax_shapes --images_dir ~/photos --out /tmp/emb
  python -m mmjax.embed --workdir W --dataset shapes/captions --split validation \
      --text_key captions --text --out /tmp/emb
  python -m mmjax.embed --workdir W --webdataset 'shards/{00000..00099}.tar' --text --out E

Writes numbered shards in clip-retrieval's layout, which faiss / autofaiss read directly
(`autofaiss build_index --embeddings OUT/img_emb --file_format npy`):

  OUT/img_emb/img_emb_<k>.npy          float16 [n, E]: L2-normalised image embeddings
  OUT/text_emb/text_emb_<k>.npy        float16 [n, E] (--text): the captions' embeddings
  OUT/metadata/metadata_<k>.parquet    row i = row i of the arrays: id, path or key, caption
  OUT/skipped/skipped_<k>.jsonl        the shard's undecodable images: {"id", "reason"}
  OUT/embed.json                       the model, step and input; a rerun must match it

Output shard k holds input items [k * shard_size, (k + 1) * shard_size) of a folder (its
image files in sorted path order) or a TFDS split, or the k-th WebDataset tar (in name
order). Process p of P embeds the shards k with k % P == p on its own devices (no
collective: processes never wait for each other) and writes them. Every file is written
under a temporary name and renamed; the metadata file, renamed last, marks a shard done.
A rerun skips the done shards and redoes the others from their start, so a killed run,
rerun, gives byte-identical files.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
from absl import flags
from etils import epath

from mmjax import command, errors, inference, sharding, vocabulary, writers
from mmjax.data import sources, transforms
from mmjax.data.images import decode_image
from mmjax.ingest import webdataset

FLAGS = flags.FLAGS
LISTED = 20  # skipped images listed in the summary, then a count
IMAGE_SUFFIXES = tuple(f".{e}" for e in webdataset.IMAGE_EXTENSIONS)  # what a folder read takes


@dataclasses.dataclass
class Item:
  """One input image: `load()` -> its encoded bytes; metadata for the parquet row."""
  id: str
  load: Any  # () -> bytes
  path: str = ""
  caption: str = ""


@dataclasses.dataclass
class Source:
  """The input: `num_shards` output shards; `items(k)` -> the items of shard k."""
  description: dict[str, Any]
  num_shards: int
  items: Any  # (k) -> Iterator[Item]
  num_items: int | None  # None: unknown until read (WebDataset)
  has_text: bool


def images_dir_source(folder: str, shard_size: int) -> Source:
  root = os.path.expanduser(folder)
  if not os.path.isdir(root):
    raise errors.UsageError(f"--images_dir {folder}: no such folder")
  paths = sorted(os.path.relpath(os.path.join(d, f), root)
                 for d, dirs, files in os.walk(root) for f in files
                 if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
  if not paths:
    raise errors.UsageError(f"--images_dir {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")

  def items(k: int) -> Iterator[Item]:
    for rel in paths[k * shard_size:(k + 1) * shard_size]:
      full = os.path.join(root, rel)
      yield Item(id=rel, path=rel, load=lambda full=full: _read(full))
  return Source({"images_dir": os.path.abspath(root), "shard_size": shard_size},
                math.ceil(len(paths) / shard_size), items, len(paths), has_text=False)


def dataset_source(name: str, split: str, data_dir: str, image_key: str, text_key: str,
                   shard_size: int) -> Source:
  opened = sources.open_source(name, split, data_dir, image_key=image_key, text_key=text_key)
  data = opened.data_source
  n = len(data)

  def items(k: int) -> Iterator[Item]:
    for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
      record = data[i]
      texts = _get(record, text_key) if text_key else []
      texts = [texts] if isinstance(texts, (str, bytes)) else list(texts)
      texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
      yield Item(id=str(i), load=lambda record=record: _get(record, image_key),
                 caption=next((t.strip() for t in texts if t.strip()), ""))
  return Source({"dataset": name, "split": split, "image_key": image_key,
                 "text_key": text_key, "shard_size": shard_size},
                math.ceil(n / shard_size), items, n, has_text=bool(text_key))


def webdataset_source(pattern: str) -> Source:
  shards = webdataset.list_shards(pattern)
  if not shards:
    raise errors.UsageError(f"--webdataset {pattern}: no shards match")

  def items(k: int) -> Iterator[Item]:
    shard = shards[k]
    try:
      for sample in webdataset.iter_samples(shard.path):
        meta = webdataset.metadata(sample.members) or {}
        caption = sample.members.get(webdataset.CAPTION_EXTENSION)
        caption = (caption.decode("utf-8", "replace") if caption is not None
                   else str(meta.get("caption", "")))
        image = webdataset.image_member(sample.members)
        yield Item(id=f"{shard.name}/{sample.key}", path=str(meta.get("url", "")),
                   caption=caption.strip(), load=lambda image=image: image or b"")
    except webdataset.UnreadableShard as e:  # listed as the shard's one skipped item
      yield Item(id=shard.name, load=lambda e=e: _raise(OSError(f"unreadable shard: {e}")))
    except webdataset.TruncatedShard:
      print(f"shard {shard.name} ends early: its samples before the break are embedded",
            flush=True)
  return Source({"webdataset": [s.name for s in shards]}, len(shards), items, None,
                has_text=True)


class Embedder:
  """Images and captions -> float16 embeddings on this process's devices only."""

  def __init__(self, model: inference.Model, batch_size: int):
    self.model = model
    mesh, rules = model.mesh, model.config.mesh.rules
    parallel = sharding.batch_parallel_size(mesh, rules)
    self.batch_size = -(-batch_size // parallel) * parallel
    self.sharding = sharding.batch_sharding(mesh, rules)
    module, size = model.module, int(model.config.data.image_size)
    self.size = size
    self._image = jax.jit(lambda p, x: _normalized(
        module.apply({"params": p}, x, method="encode_image")[0]))
    self._text = jax.jit(lambda p, t, tt: _normalized(
        module.apply({"params": p}, t, tt, method="encode_text")))

  def images(self, pixels: np.ndarray) -> Any:
    """uint8 [b <= batch_size, S, S, 3] -> a device array of float16 [batch_size, E]."""
    return self._image(self.model.params, self._put(pixels))

  def texts(self, captions: list[str]) -> Any:
    tokens = self.model.tokenizer.encode(captions, int(self.model.config.data.max_text_len))
    text_type = np.full(len(captions), vocabulary.CAPTION, np.int32)
    return self._text(self.model.params, self._put(tokens), self._put(text_type))

  def _put(self, x: np.ndarray) -> jax.Array:
    pad = self.batch_size - len(x)
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return jax.device_put(x, self.sharding)


def _normalized(x: jax.Array) -> jax.Array:
  x = x.astype(np.float32)
  return (x / jax.numpy.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)


def embed_shard(embedder: Embedder, items: Iterator[Item], with_text: bool,
                pool: concurrent.futures.Executor, on_batch: Any
                ) -> tuple[np.ndarray, np.ndarray | None, list[Item], list[dict]]:
  """-> (image embeddings [n, E], text embeddings or None, kept items, skipped rows)."""
  kept, skipped, images, texts = [], [], [], []
  pending: list[tuple[Any, Any, int]] = []

  def flush(batch: list[tuple[Item, np.ndarray]]) -> None:
    pixels = np.stack([p for _, p in batch])
    image = embedder.images(pixels)
    text = embedder.texts([item.caption for item, _ in batch]) if with_text else None
    pending.append((image, text, len(batch)))
    if len(pending) > 1:  # the device runs this batch while the host collects the last
      collect(*pending.pop(0))

  def collect(image: Any, text: Any, n: int) -> None:
    images.append(np.asarray(image)[:n])
    if text is not None:
      texts.append(np.asarray(text)[:n])
    on_batch(n)

  batch: list[tuple[Item, np.ndarray]] = []
  chunk: list[Item] = []
  for item in _chain(items, [None]):
    if item is not None:
      chunk.append(item)
    if len(chunk) < embedder.batch_size and item is not None:
      continue
    for it, (pixels, reason) in zip(chunk, pool.map(lambda i: _prepare(i, embedder.size),
                                                   chunk)):
      if reason:
        skipped.append({"id": it.id, "reason": reason})
        continue
      kept.append(it)
      batch.append((it, pixels))
      if len(batch) == embedder.batch_size:
        flush(batch)
        batch = []
    chunk = []
  if batch:
    flush(batch)
  for args in pending:
    collect(*args)
  dim = embedder.model.config.model.embed_dim
  image_emb = np.concatenate(images) if images else np.zeros((0, dim), np.float16)
  text_emb = None
  if with_text:
    text_emb = np.concatenate(texts) if texts else np.zeros((0, dim), np.float16)
  return image_emb, text_emb, kept, skipped


def _chain(items: Iterator[Item], tail: list) -> Iterator[Item | None]:
  yield from items
  yield from tail


def _prepare(item: Item, size: int) -> tuple[np.ndarray | None, str]:
  """Decodes and centre-crops one image, or says why it cannot be used (worded as the
  dataset builder's check_images words it)."""
  try:
    data = item.load()
  except OSError as e:
    return None, f"cannot read ({e.strerror or e})"
  if not data:
    return None, "empty file"
  try:
    rgb = decode_image(data)
  except PIL.UnidentifiedImageError:
    return None, "not an image (no format Pillow reads)"
  except Exception as e:  # whatever Pillow raises for this file
    return None, f"not a decodable image ({errors.one_line(str(e)) or type(e).__name__})"
  return transforms.center_crop_resize(rgb, size), ""


def write_shard(out: epath.Path, k: int, image_emb: np.ndarray, text_emb: np.ndarray | None,
                kept: list[Item], skipped: list[dict]) -> None:
  """The shard's files, each written to a temporary name and renamed; metadata last."""
  _atomic(out / "skipped" / f"skipped_{k:05d}.jsonl",
          "".join(json.dumps(s) + "\n" for s in skipped).encode())
  _atomic(out / "img_emb" / f"img_emb_{k:05d}.npy", _npy(image_emb))
  if text_emb is not None:
    _atomic(out / "text_emb" / f"text_emb_{k:05d}.npy", _npy(text_emb))
  table = pa.table({"id": [i.id for i in kept], "path": [i.path for i in kept],
                    "caption": [i.caption for i in kept]})
  buf = io.BytesIO()
  pq.write_table(table, buf)
  _atomic(out / "metadata" / f"metadata_{k:05d}.parquet", buf.getvalue())


def shard_done(out: epath.Path, k: int) -> bool:
  return (out / "metadata" / f"metadata_{k:05d}.parquet").exists()


def _npy(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(array))
  return buf.getvalue()


def _atomic(path: epath.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp{jax.process_index()}"
  tmp.write_bytes(data)
  tmp.rename(path)


def _raise(error: Exception) -> bytes:
  raise error


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _get(record: Any, key: str) -> Any:
  for part in key.split("/"):
    record = record[part]
  return record


def _check_info(out: epath.Path, info: dict[str, Any]) -> None:
  """Writes OUT/embed.json, or checks that a rerun embeds the same things the same way."""
  path = out / "embed.json"
  text = json.dumps(info, indent=1, sort_keys=True) + "\n"
  if path.exists():
    if path.read_text() != text:
      stored = json.loads(path.read_text())
      changed = sorted(k for k in set(stored) | set(info) if stored.get(k) != info.get(k))
      raise errors.UsageError(
          f"--out {out} holds embeddings of another run (differs in {', '.join(changed)}, "
          f"see {path}): resume with the same flags or choose another --out")
  elif jax.process_index() == 0:
    _atomic(path, text.encode())


class _Progress:
  """`embed: N images, shard i/n, images/s, ETA` every 10 s and at the end (lead process)."""

  def __init__(self, shards: int, images: int | None):
    self.shards, self.images = shards, images
    self.done_shards = self.done_images = 0
    self.start = self.last = time.monotonic()
    self.enabled = jax.process_index() == 0

  def batch(self, n: int) -> None:
    self.done_images += n
    self.show()

  def shard(self) -> None:
    self.done_shards += 1
    self.show(force=True)

  def show(self, force: bool = False) -> None:
    now = time.monotonic()
    if not self.enabled or (now - self.last < 10 and not force):
      return
    self.last = now
    rate = self.done_images / max(now - self.start, 1e-9)
    if self.images:
      eta = (self.images - self.done_images) / rate if rate else 0.0
    else:  # WebDataset: images per shard unknown until read
      eta = (now - self.start) / max(self.done_shards, 1) * (self.shards - self.done_shards)
    total = f"/{self.images}" if self.images else ""
    print(f"embed: {self.done_images}{total} images read, shard {self.done_shards}/{self.shards}, "
          f"{rate:.1f} images/s, ETA {writers.format_seconds(eta)}", flush=True)


def run_embed(workdir: str, out: str, source: Source, *, step: int | None = None,
              with_text: bool = False, batch_size: int = 64, ema: bool = False) -> dict:
  """Embeds this process's shards of `source` into `out`; returns a summary dict."""
  if with_text and not source.has_text:
    raise errors.UsageError("--text: this input has no captions (--images_dir holds images "
                            "only; for a TFDS dataset give --text_key)")
  model = inference.load(workdir, step=step, ema=ema, devices=jax.local_devices())
  out_path = epath.Path(os.path.expanduser(out))
  out_path.mkdir(parents=True, exist_ok=True)
  info = {"workdir": os.path.abspath(os.path.expanduser(workdir)), "step": model.step,
          "ema": ema, "model": model.config.model.name, "text": with_text,
          "embed_dim": int(model.config.model.embed_dim), "num_shards": source.num_shards,
          "input": source.description}
  _check_info(out_path, info)
  embedder = Embedder(model, batch_size)
  p, count = jax.process_index(), jax.process_count()
  mine = [k for k in range(source.num_shards) if k % count == p]
  todo = [k for k in mine if not shard_done(out_path, k)]
  if len(todo) < len(mine) and p == 0:
    print(f"Resuming: {len(mine) - len(todo)} of this process's {len(mine)} shards are "
          "done", flush=True)
  per_shard = source.num_items / source.num_shards if source.num_items else None
  progress = _Progress(len(todo), round(per_shard * len(todo)) if per_shard else None)
  fault = int(os.environ.get("MMJAX_DEBUG_EMBED_EXIT_AFTER_SHARDS", "-1"))
  skipped, embedded = [], 0
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    for n, k in enumerate(todo):
      if n == fault:  # tests: a run killed between shards (os._exit skips every cleanup)
        os._exit(17)
      image_emb, text_emb, kept, bad = embed_shard(embedder, source.items(k), with_text, pool,
                                                   progress.batch)
      write_shard(out_path, k, image_emb, text_emb, kept, bad)
      skipped += bad
      embedded += len(kept)
      progress.done_images += len(bad)
      progress.shard()
  return {"shards": len(todo), "images": embedded, "skipped": skipped,
          "done_before": len(mine) - len(todo)}


def _summary(result: dict, out: str) -> str:
  lines = [f"Embedded {result['images']} images into {result['shards']} shards in {out} "
           f"(process {jax.process_index()} of {jax.process_count()}; "
           f"{result['done_before']} shards were done before)",
           f"  skipped: {len(result['skipped'])}"]
  lines += [f"    {s['id']}: {s['reason']}" for s in result["skipped"][:LISTED]]
  if len(result["skipped"]) > LISTED:
    lines.append(f"    ... and {len(result['skipped']) - LISTED} more")
  return "\n".join(lines)


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Work directory of the checkpoint to embed with.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  flags.DEFINE_bool("ema", False, "Embed with the EMA of the parameters.")
  flags.DEFINE_string("out", None, "Output folder (local or gs://).")
  flags.DEFINE_string("images_dir", None, "A folder of images (searched recursively).")
  flags.DEFINE_string("dataset", None, "A TFDS dataset name (with --split).")
  flags.DEFINE_string("split", None, "The TFDS split of --dataset.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir of --dataset (default: the checkpoint "
                      "config's).")
  flags.DEFINE_string("image_key", "image", "--dataset's image feature.")
  flags.DEFINE_string("text_key", "", "--dataset's caption feature (for --text).")
  flags.DEFINE_string("webdataset", None, "WebDataset tar shards, e.g. 'dir/{00000..00099}.tar'.")
  flags.DEFINE_bool("text", False, "Also embed each image's caption.")
  flags.DEFINE_integer("batch_size", 64, "Images per device batch (rounded up to the "
                       "number of this process's devices).")
  flags.DEFINE_integer("shard_size", 10_000, "Images per output shard (folders, TFDS).")
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0 for multi-process runs without auto-detection.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with coordinator_address).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  del argv
  f = FLAGS
  if f.coordinator_address:
    if f.num_processes is None or f.process_id is None:
      raise errors.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id)
  given = [name for name in ("images_dir", "dataset", "webdataset") if f[name].value]
  if len(given) != 1:
    raise errors.UsageError("give exactly one input: --images_dir DIR, --dataset NAME --split "
                            f"S, or --webdataset PATTERN (got {given or 'none'})")
  if f.shard_size < 1 or f.batch_size < 1:
    raise errors.UsageError("--shard_size and --batch_size must be positive")
  if f.images_dir:
    source = images_dir_source(f.images_dir, f.shard_size)
  elif f.dataset:
    if not f.split:
      raise errors.UsageError("--dataset needs --split (e.g. --split validation)")
    data_dir = f.data_dir
    if data_dir is None:
      data_dir = inference.stored_config(f.workdir, f.step)["data_dir"]
    source = dataset_source(f.dataset, f.split, data_dir, f.image_key, f.text_key,
                            f.shard_size)
  else:
    source = webdataset_source(f.webdataset)
  result = run_embed(f.workdir, f.out, source, step=f.step, with_text=f.text,
                     batch_size=f.batch_size, ema=f.ema)
  print(_summary(result, f.out), flush=True)


if __name__ == "__main__":
  _define_flags()
  # No --config: the checkpoint's own config is read from --workdir.
  command.run(main, "mmjax.embed", config=False)
