"""Checkpointer retention, uncommitted saves and shape checks, in-process on tiny pytrees."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmjax import checkpoint, errors, integrity, retry
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.tokenizers import sentencepiece
from mmjax.state import TrainState


def small_state(value: float = 0.0) -> TrainState:
  return TrainState(step=jnp.int32(0), params={"dense": {"kernel": jnp.full((2, 3), value)}},
                    opt_state={"mu": jnp.zeros(3)}, nonfinite_steps=jnp.int32(0))


def checkpointer(tmp_path, max_to_keep: int, keep_period: int) -> checkpoint.Checkpointer:
  config = helpers.tiny_config(**{"checkpoint.max_to_keep": max_to_keep,
                                  "checkpoint.keep_period": keep_period})
  return checkpoint.Checkpointer(str(tmp_path), config)


def test_keeps_last_n_plus_every_kth(tmp_path):
  ckpt = checkpointer(tmp_path, max_to_keep=2, keep_period=4)
  config = helpers.tiny_config()
  for step in range(1, 12):
    ckpt.save(step, small_state(step), config)
  ckpt.close()
  # keep_period=4 keeps steps divisible by 4 (not "every 4th save"), OR-ed with the last 2.
  assert sorted(int(s) for s in os.listdir(ckpt.directory)) == [4, 8, 10, 11]


def test_without_keep_period_only_the_last_n_remain(tmp_path):
  ckpt = checkpointer(tmp_path, max_to_keep=3, keep_period=0)
  config = helpers.tiny_config()
  for step in (5, 10, 15, 20):
    ckpt.save(step, small_state(step), config)
  ckpt.close()
  assert sorted(int(s) for s in os.listdir(ckpt.directory)) == [10, 15, 20]


def test_uncommitted_save_is_ignored_and_cleaned_up(tmp_path):
  ckpt = checkpointer(tmp_path, max_to_keep=3, keep_period=0)
  config = helpers.tiny_config()
  ckpt.save(5, small_state(5.0), config)
  ckpt.close()
  # What a process killed mid-save leaves behind: a temporary directory with partial files.
  tmp = os.path.join(ckpt.directory, "10.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(tmp, "state"))
  with open(os.path.join(tmp, "state", "partial"), "wb") as f:
    f.write(b"\0" * 10)
  reopened = checkpointer(tmp_path, max_to_keep=3, keep_period=0)
  assert reopened.latest_step() == 5
  restored = reopened.restore(5, jax_abstract(small_state()))
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((2, 3), 5.0))
  assert reopened.saved_config(5)["batch_size"] == config.batch_size
  reopened.close()
  assert not os.path.exists(tmp)  # Orbax deletes leftovers in the background at start


def test_saves_and_seals_refused_by_a_flaky_store_are_retried_and_counted(tmp_path, capsys):
  # 30% of the store's answers are 503s (mmjax.retry's injection, MMJAX_DEBUG_STORE_FAILURES
  # in a real run): every step is still committed, sealed and restored; the retries counted.
  faults = retry.InjectedFailures(0.3, first=1, last=100, seed=3)
  faults.at_step(1)
  storage = retry.Retrier(delay_s=0, attempts=20, faults=faults)
  config = helpers.tiny_config(**{"checkpoint.max_to_keep": 20})
  ckpt = checkpoint.Checkpointer(str(tmp_path), config, retrier=storage)
  for step in range(1, 13):
    ckpt.save(step, small_state(step), config)
  ckpt.close()
  assert faults.injected > 3 and storage.retries == faults.injected
  assert "503 Service Unavailable (injected): checkpoint save of step" in capsys.readouterr().err
  reopened = checkpoint.Checkpointer(str(tmp_path), config)
  assert reopened.manager.all_steps() == list(range(1, 13))
  for step in range(1, 13):
    step_dir = os.path.join(reopened.directory, str(step))
    assert os.path.exists(os.path.join(step_dir, integrity.MANIFEST))
  restored = reopened.restore(12, jax_abstract(small_state()))
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], np.full((2, 3), 12.0))
  reopened.close()


def test_assets_round_trip_and_a_checkpoint_without_them_reads_as_none(tmp_path):
  ckpt = checkpointer(tmp_path, max_to_keep=3, keep_period=0)
  config = helpers.tiny_config()
  blob = bytes(range(256)) * 3  # any bytes, not only text
  ckpt.save(1, small_state(1.0), config, assets={"tokenizer.model": blob, "notes.txt": b"x"})
  ckpt.save(2, small_state(2.0), config)  # as checkpoints from before assets existed
  ckpt.close()
  reopened = checkpointer(tmp_path, max_to_keep=3, keep_period=0)
  assert reopened.restore_assets(1) == {"tokenizer.model": blob, "notes.txt": b"x"}
  assert reopened.restore_assets(2) == {}
  reopened.close()


def test_restore_params_names_what_the_checkpoint_lacks(tmp_path):
  """Parameters only, the EMA asked of a run without one, and a state without parameters."""
  ckpt = checkpointer(tmp_path, max_to_keep=3, keep_period=0)
  config = helpers.tiny_config()
  ckpt.save(1, small_state(1.0), config)
  ckpt.save(2, {"weights": jnp.ones(3)}, config)  # not a train state
  ckpt.close()
  ckpt = checkpointer(tmp_path, max_to_keep=3, keep_period=0)  # as a reader opens it
  abstract = {"dense": {"kernel": jnp.zeros((2, 3))}}
  np.testing.assert_array_equal(ckpt.restore_params(1, abstract)["dense"]["kernel"],
                                np.ones((2, 3)))
  with pytest.raises(errors.UsageError, match=r"step 1 has no EMA of the parameters"):
    ckpt.restore_params(1, abstract, ema=True)
  with pytest.raises(errors.UsageError, match=r"step 2 holds no parameters: it is not a "
                     r"train-state checkpoint"):
    ckpt.restore_params(2, abstract)
  ckpt.close()


def test_the_stored_tokenizer_wins_over_the_configured_one(tmp_path):
  trained = sentencepiece.train_tokenizer(["a red circle", "a blue square"] * 20, 40)
  # data.tokenizer.path names a file that does not exist here: without assets that is an
  # error, with them the checkpoint's tokenizer is used and the path is never read.
  config = helpers.tiny_config(**{"data.tokenizer.path": str(tmp_path / "gone.model")})
  with pytest.raises(errors.UsageError, match="gone.model"):
    tokenizer_lib.get_tokenizer(config)
  assets = tokenizer_lib.checkpoint_assets(trained)
  assert list(assets) == ["tokenizer.model"]
  restored = tokenizer_lib.get_tokenizer(config, assets)
  np.testing.assert_array_equal(restored.encode(["a red square"], 8),
                                trained.encode(["a red square"], 8))


def jax_abstract(tree):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def test_check_shapes_names_the_first_mismatching_path_and_both_shapes():
  stored = {"a": {"kernel": (4, 8)}, "b": {"kernel": (8, 8), "bias": (8,)}}
  expected = {"a": {"kernel": np.zeros((4, 8))},
              "b": {"kernel": np.zeros((8, 6)), "bias": np.zeros((6,))}}
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"/ckpt step 7 .* at params/b/bias: checkpoint has shape \(8,\), "
                           r"config expects shape \(6,\)"):
    checkpoint.check_shapes(stored, expected, "/ckpt", 7, prefix="params")
  matching = {"a": {"kernel": np.zeros((4, 8))},
              "b": {"kernel": np.zeros((8, 8)), "bias": np.zeros(8)}}
  checkpoint.check_shapes(stored, matching, "/ckpt", 7)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"params/c: checkpoint has no such entry, config expects shape \(2,\)"):
    checkpoint.check_shapes(stored, {**matching, "c": np.zeros(2)}, "/ckpt", 7, prefix="params")


def test_config_changes_ignores_schedule_and_eval_keys():
  saved = helpers.tiny_config().to_dict()
  changed = helpers.tiny_config(total_steps=99, log_every_steps=1, eval_every_steps=0,
                                **{"eval_batch_size": 8, "model.text.width": 48, "seed": 3})
  assert checkpoint.config_changes(saved, changed) == ["model.text.width", "seed"]
  assert checkpoint.config_changes(saved, helpers.tiny_config()) == []
