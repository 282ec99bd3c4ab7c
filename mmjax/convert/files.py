"""Reading and writing other frameworks' weight files as data, never as code.

`.safetensors` is read without torch (safetensors' NumPy loader). `.pt` / `.bin` / `.pth`
are pickles: they are read only by torch's weights-only unpickler, which builds tensors and
plain containers and refuses anything else, so a file that would run code on load is
refused with one line naming safetensors as the way. Outputs are written into a temporary
folder beside `--out` and renamed into place at the end: a failed run leaves nothing.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np

from mmjax import errors

TORCH_SUFFIXES = (".pt", ".bin", ".pth")
EXTRA = "pip install 'mmjax[reference]'"


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict file -> {name: NumPy array} with each tensor's own dtype.

  Training checkpoints ({"state_dict": ...}) are unwrapped and DDP's "module." prefixes
  dropped. Raises UsageError (one line: what is wrong and the fix) for a missing file, an
  unknown format, a pickle that needs more than tensors, or torch not installed."""
  if not os.path.exists(path):
    raise errors.UsageError(f"--checkpoint={path}: no such file")
  if os.path.isdir(path):
    raise errors.UsageError(f"--checkpoint={path} is a folder: name its weights file, or use "
                            "--from hf for a Hugging Face model folder")
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      raw = load_file(path)
    except (SafetensorError, OSError, TypeError) as e:
      raise errors.UsageError(f"--checkpoint={path}: not a readable safetensors file "
                              f"({errors.one_line(e)})") from None
  elif path.endswith(TORCH_SUFFIXES):
    raw = _load_torch_weights_only(path)
  else:
    raise errors.UsageError(f"--checkpoint={path}: unknown format; expected .safetensors "
                            f"or a torch state dict ({', '.join(TORCH_SUFFIXES)})")
  if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"],
                                                                    Mapping):
    raw = raw["state_dict"]
  if not isinstance(raw, Mapping) or not all(isinstance(v, np.ndarray) for v in raw.values()):
    raise errors.UsageError(f"--checkpoint={path}: not a state dict (a mapping of names to "
                            "tensors)")
  return {k.removeprefix("module."): v for k, v in raw.items()}


def _load_torch_weights_only(path: str) -> dict:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError:
    raise errors.UsageError(f"--checkpoint={path}: reading torch pickles needs torch "
                            f"({EXTRA}); or convert the file to .safetensors") from None
  try:
    raw = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # The weights-only unpickler met a global that is not a tensor or container: the file
    # would run code (or build objects) on load. Refused, never retried unsafely.
    first = errors.one_line(str(e).split("\n\n")[0])[:160]
    raise errors.UsageError(
        f"--checkpoint={path}: refused: the pickle needs more than tensors to load "
        f"({first}); load it only if you trust it and save its state dict with "
        "safetensors.torch.save_file, then convert the .safetensors file") from None
  except (RuntimeError, EOFError, OSError) as e:
    raise errors.UsageError(f"--checkpoint={path}: not a readable torch file "
                            f"({errors.one_line(e)[:160]})") from None
  if isinstance(raw, Mapping) and "state_dict" in raw:
    raw = raw["state_dict"]
  if not isinstance(raw, Mapping):
    raise errors.UsageError(f"--checkpoint={path}: not a state dict")
  return {k: _to_numpy(v) for k, v in raw.items()}


def _to_numpy(tensor) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  if not isinstance(tensor, torch.Tensor):
    return tensor
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: exact in float32
    tensor = tensor.float()
  return tensor.numpy()


def hf_weights_file(folder: str) -> str:
  """model.safetensors (preferred) or pytorch_model.bin of a Hugging Face model folder."""
  if not os.path.isdir(folder):
    raise errors.UsageError(f"--checkpoint={folder}: no such folder (a Hugging Face model "
                            "folder with config.json and model.safetensors)")
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise errors.UsageError(f"--checkpoint={folder}: no model.safetensors or pytorch_model.bin "
                          "(sharded checkpoints: merge them with save_pretrained("
                          "max_shard_size='100GB') first)")


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str,
                     metadata: dict[str, str] | None = None) -> None:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, path,
            metadata=metadata)


@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
  """Yields a temporary folder beside `out`, renamed to `out` when the block succeeds and
  removed when it fails. `out` must not exist or be an empty folder."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise errors.UsageError(f"--out={out} already exists and is not empty: choose a new "
                            "folder")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
  try:
    yield staging
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(staging, out)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
