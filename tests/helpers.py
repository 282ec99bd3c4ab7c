"""What tests share: configs with overrides, synthetic batches, the real runtime, data on disk
(stand-in TFDS catalog data, a folder with corrupt images, pipeline batches), the CLI run as
a subprocess, tree comparisons (the code paths are the real ones).

Image files of every mode and undecodable ones: tests/image_files.py; fixtures (the shapes
data, an in-memory gs://): tests/conftest.py.
"""
import io
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from configs import flava, shapes
from conftest import CACHE_DIR, REPO
from mmjax import objectives, runtime
from mmjax.data import pipeline
from mmjax.ingest import files as build


def override(config, **overrides):
  """Unlocks, sets dotted keys ("model.dtype"), locks again; returns the same config."""
  config.unlock()
  config.update_from_flattened_dict(overrides)
  config.lock()
  return config


def tiny_config(preset: str = "coca_unicl_prefix", **overrides):
  """configs/shapes.py:<preset>,tiny with dotted-key overrides."""
  return override(shapes.get_config(f"{preset},tiny"), **overrides)


def flava_config(variant: str = "tiny", **overrides):
  """configs/flava.py:<variant> with dotted-key overrides."""
  return override(flava.get_config(variant), **overrides)


def data_config(data_dir: str, **overrides):
  """configs/shapes.py's default at batch 16 reading `data_dir`, returned unlocked (data
  tests swap whole sections, e.g. data.sources)."""
  config = override(shapes.get_config(), **{"data_dir": data_dir, "batch_size": 16, **overrides})
  config.unlock()
  return config


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
  return dict(image=rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8), text=text,
              label=label, text_type=(label >= 0).astype(np.int32),
              source=(label >= 0).astype(np.int32),  # sorted source keys: captions, labels
              skipped=zeros, has_image=ones, has_text=ones, paired=ones)


def flava_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """Paired, image-only and text-only examples (row i: paired if i % 4 < 2, image-only if
  i % 4 == 2, text-only if i % 4 == 3), as the pipeline emits them for FLAVA."""
  rng = np.random.default_rng(seed)
  b, length, size = config.batch_size, config.data.max_text_len, config.data.image_size
  vocab = config.model.text.vocab_size
  text = np.zeros((b, length), np.int32)
  for i in range(b):
    n = rng.integers(4, length + 1)
    text[i, 0], text[i, n - 1] = 2, 1
    text[i, 1:n - 1] = rng.integers(4, vocab, n - 2)
  kind = np.arange(b) % 4
  paired = (kind < 2).astype(np.int32)
  has_image = (kind != 3).astype(np.int32)
  has_text = (kind != 2).astype(np.int32)
  text[has_text == 0] = 0
  image = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
  image[has_image == 0] = 0
  label = np.where(kind == 0, rng.integers(0, 3, b), -1).astype(np.int32)
  return dict(image=image, text=text, label=label, text_type=np.zeros(b, np.int32),
              source=kind.astype(np.int32), skipped=np.zeros(b, np.int32),
              has_image=has_image, has_text=has_text, paired=paired)


def init_params(config, model):
  """`model`'s parameters (seed 0, unboxed) initialised on `flava_batch(config)`."""
  batch = flava_batch(config)
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["image"],
                                      batch["text"])["params"])


def step_setup(config, num_devices: int):
  """The real runtime for `config` on the first `num_devices` devices, and a fresh sharded
  train state: (runtime.Runtime, state)."""
  rt = runtime.build(config, jax.devices()[:num_devices])
  with rt.activate():
    state = rt.init_state()
  return rt, state


def objective_grads(config, batch: dict[str, np.ndarray], step=None):
  """The config's objective, jitted with the runtime's shardings on a mesh of
  config.mesh.shape's devices, on `batch` from a fresh state at `step` (default: the
  state's): (loss, aux, grads, state), loss, aux and grads on the host."""
  rt, state = step_setup(config, math.prod(config.mesh.shape))
  with rt.activate():
    grads_fn = jax.jit(rt.objective.grads, in_shardings=(rt.shardings.params, rt.batch_sharding,
                                                         None))
    loss, aux, grads = grads_fn(state.params, rt.global_batch(batch),
                                state.step if step is None else step)
  return float(loss), jax.device_get(aux), jax.device_get(grads), state


def loss_and_grads(mesh_shape, preset: str = "coca_unicl_prefix", **overrides):
  """objective_grads of tiny_config(preset) on synthetic_batch: (loss, grads, state)."""
  config = tiny_config(preset, **{"mesh.shape": mesh_shape, **overrides})
  loss, _, grads, state = objective_grads(config, synthetic_batch(config))
  return loss, grads, state


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


def write_bad_folder(name: str, data_dir: str, size: tuple[int, int] = (30, 40)) -> None:
  """A label dataset of 12 records, 2 of them undecodable (corrupt, zero bytes), as a
  builder that stores bytes unchecked (e.g. a web-scale one) writes it."""
  rng = np.random.default_rng(0)
  examples = []
  for label, cls in enumerate(("cat", "dog")):
    for i in range(5):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(buf, format="JPEG")
      examples.append({"image": buf.getvalue(), "file_name": f"{cls}/{i}.jpg", "label": label})
  examples.append({"image": b"\xff\xd8\xff\xe0 not really a jpeg", "file_name": "cat/corrupt.jpg",
                   "label": 0})
  examples.append({"image": b"", "file_name": "dog/empty.jpg", "label": 1})
  features = {"image": tfds.features.Image(shape=(None, None, 3)),
              "file_name": tfds.features.Text(),
              "label": tfds.features.ClassLabel(names=["cat", "dog"])}
  build.write_dataset(name, data_dir, features, {"train": examples})


def take(config, tokenizer, n: int, start_step: int = 0, process_index: int = 0,
         process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first `n` batches of the training pipeline from `start_step` (iterator closed)."""
  it = pipeline.make_train_iterator(config, tokenizer, start_step=start_step,
                                    process_index=process_index, process_count=process_count,
                                    unimodal_steps=objectives.unimodal_steps(config))
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


# --- the CLIs as a user runs them: subprocesses in the repository root ---------------------
SHAPES_TINY = f"{REPO}/configs/shapes.py:coca_unicl_prefix,tiny"
FLAVA_TINY = f"{REPO}/configs/flava.py:tiny"


def environment(devices: int = 1) -> dict[str, str]:
  """A subprocess's environment: this checkout importable, JAX on `devices` CPU devices
  (without this process's NPROC: the command sizes XLA's thread pool for `devices`)."""
  inherited = {k: v for k, v in os.environ.items() if k != "NPROC"}
  return {**inherited, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
          "JAX_NUM_CPU_DEVICES": str(devices)}


def command(module: str, workdir: str, data_dir: str, *overrides: str,
            config: str = SHAPES_TINY) -> list[str]:
  """`python -m module` on `config` in `workdir`, reading `data_dir`, with the tests'
  compilation cache."""
  return [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", f"--config.compilation_cache_dir={CACHE_DIR}",
          *overrides]


def call(argv: list[str], *, devices: int = 1, env: dict[str, str] | None = None,
         timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
  """Runs `argv` to the end in the repository root with `environment(devices)` updated by
  `env`, output captured as text; returns the process whatever its exit status."""
  return subprocess.run(argv, cwd=REPO, env={**environment(devices), **(env or {})},
                        capture_output=True, text=True, timeout=timeout, **kwargs)


def run(module: str, workdir: str, data_dir: str, *overrides: str, devices: int = 1,
        expect: int = 0, env: dict[str, str] | None = None,
        config: str = SHAPES_TINY) -> subprocess.CompletedProcess:
  """`command(...)` run to the end; its exit status must be `expect`."""
  proc = call(command(module, workdir, data_dir, *overrides, config=config), devices=devices,
              env=env)
  assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def run_cli(module: str, *args: str, config: str = SHAPES_TINY,
            env: dict[str, str] | None = None, user=None) -> subprocess.CompletedProcess:
  """`python -m module --config=config args...` exactly as given (no test flags added)."""
  return call([sys.executable, "-m", module, f"--config={config}", *args], env=env, user=user)


def usage_error(proc: subprocess.CompletedProcess, command: str = "mmjax.train") -> str:
  """The process failed with exactly one stderr line `<command>: error: ...`; returns it."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"{command}: error: "), lines[0]
  return lines[0]


def metrics(workdir: str) -> list[dict]:
  """The records of `workdir`/metrics.jsonl, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def assert_trees_close(a, b, rtol: float) -> None:
  """Relative to the whole gradient: some gradients are exactly zero in exact arithmetic
  (e.g. attention key biases) and only float noise per leaf."""
  scale = max(np.abs(y).max() for y in jax.tree.leaves(b))
  diff = [(jax.tree_util.keystr(path), np.abs(x - y).max())
          for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))]
  worst = max(diff, key=lambda d: d[1])
  assert worst[1] <= rtol * scale, worst
  norm = lambda t: np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(t)))
  assert norm(jax.tree.map(np.subtract, a, b)) <= rtol * norm(b)


def checkpoint_params(workdir: str, step: int) -> dict:
  """The parameters of `workdir`'s persistent checkpoint `step` as NumPy arrays, read from
  its files alone (no devices, no config: compares runs of any process count)."""
  path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
  metadata = ocp.PyTreeCheckpointHandler().metadata(path)
  tree = getattr(metadata, "tree", metadata)["params"]
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                              is_leaf=lambda m: hasattr(m, "shape"))
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        {"params": tree}, restore_args={"params": restore_args}, partial_restore=True))
  return restored["params"]
