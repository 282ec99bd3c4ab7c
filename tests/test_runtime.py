"""mmjax.runtime: the one setup path (mesh, model, state, step) every command uses; its
train step is tested in tests/test_step.py, its ahead-of-time lowering in tests/test_aot.py."""
import os

import jax
import pytest

import helpers
from conftest import REPO
from mmjax import cli, runtime
from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizer_lib


@pytest.mark.parametrize("spec", ["configs/shapes.py:coca_unicl_prefix,tiny",
                                  "configs/flava.py:tiny"])
def test_abstract_batch_is_the_pipelines_batch(spec, data_dir):
  """What is compiled (`Runtime.abstract_batch`, lowered by mmjax.train and mmjax.aot alike)
  takes exactly the batch the input pipeline yields."""
  config = helpers.override(cli.load_config(os.path.join(REPO, spec)),
                           **{"data_dir": data_dir, "data.num_workers": 0})
  iterator = pipeline.make_train_iterator(config, tokenizer_lib.get_tokenizer(config),
                                          start_step=0, process_index=0, process_count=1)
  batch = next(iterator)
  iterator.close()
  abstract = runtime.build(config, jax.devices()[:1]).abstract_batch()
  assert ({k: (v.shape, v.dtype) for k, v in abstract.items()}
          == {k: (v.shape, v.dtype) for k, v in batch.items()})


def test_params_only_runtime_has_no_optimizer_and_abstract_params_only():
  config = helpers.tiny_config(**{"mesh.shape": (2, 1, 1)})
  full = runtime.build(config, jax.devices()[:2])
  params_only = runtime.build(config, jax.devices()[:2], params_only=True)
  assert dict(full.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
  assert (jax.tree.structure(params_only.abstract_state)
          == jax.tree.structure(full.abstract_state.params))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(full.abstract_state))
