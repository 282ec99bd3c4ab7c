"""mmjax: multimodal (image-text-label) foundation models on JAX/Flax.

Importing it changes nothing in the process: commands size XLA:CPU's thread pool through
`mmjax.devices.configure_cpu_devices()` (called by `mmjax.command.run`)."""
import importlib


def __getattr__(name: str):
  """`mmjax.load` (mmjax.inference.load), imported on first use: `import mmjax` stays cheap
  (no JAX, Flax or TFDS import) for the commands and Grain workers that import it."""
  if name == "load":
    return importlib.import_module("mmjax.inference").load
  raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
