"""Fine-tuning switches: locked parameters (optimizer.frozen, frozen_until_step), layer-wise
learning-rate decay, the parameters' EMA, each against what it must mean, on tiny configs."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import pretrained
from mmjax import checkpoint, errors, export, optimizer as optimizer_lib, param_groups
from mmjax import warm_start
from mmjax.convert import files
from mmjax.models import vit

VISION = "vision/.*"


def run_steps(config, num_steps: int, seed: int = 0):
  """(runtime, initial state on the host, final state, per-step metrics) after `num_steps`
  updates on synthetic batches (batch k has seed + k)."""
  rt, state = helpers.step_setup(config, 1)
  initial = jax.device_get(state)
  metrics = []
  with rt.activate():
    step = rt.jit_train_step()
    for k in range(num_steps):
      state, m = step(state, rt.global_batch(helpers.synthetic_batch(config, seed + k)))
      metrics.append(jax.device_get(m))
  return rt, initial, jax.device_get(state), metrics


def flat(tree) -> dict[str, np.ndarray]:
  return {param_groups.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_locked_tower_is_unchanged_and_has_no_optimizer_state():
  config = helpers.tiny_config(**{"optimizer.frozen": VISION})
  _, before, after, metrics = run_steps(config, 3)
  assert all(m["finite"] for m in metrics)
  old, new = flat(before.params), flat(after.params)
  locked = [k for k in old if k.startswith("vision/")]
  assert locked and all(np.array_equal(old[k], new[k]) for k in locked)  # bit for bit
  assert all(not np.array_equal(old[k], new[k]) for k in old
             if not k.startswith("vision/") and k.endswith("kernel"))
  # The optimizer state holds nothing for them: AdamW's two moments of the rest only.
  vision_bytes = state_bytes({k: v for k, v in old.items() if k.startswith("vision/")})
  plain = helpers.tiny_config()
  _, plain_state = helpers.step_setup(plain, 1)
  assert state_bytes(plain_state.opt_state) - state_bytes(before.opt_state) == 2 * vision_bytes
  assert not any("vision" in k for k in flat(before.opt_state))


def compiled_flops(config) -> float:
  rt = helpers.runtime.build(config, jax.devices()[:1])
  return rt.lower_train_step().compile().cost_analysis()["flops"]


def test_locked_tower_has_no_backward_pass():
  """With the image tower locked its backward is gone: the step's compiled FLOPs drop by
  more than the tower's forward (a backward costs about twice the forward)."""
  config = helpers.tiny_config(**{"optimizer.frozen": VISION})
  full, locked = compiled_flops(helpers.tiny_config()), compiled_flops(config)
  delayed = compiled_flops(helpers.tiny_config(**{"optimizer.frozen": VISION,
                                                  "optimizer.frozen_until_step": 2}))
  assert locked < 0.8 * full
  assert delayed > 0.95 * full  # locked for a while: the gradient is still computed


def test_frozen_until_step_unlocks_with_a_fresh_optimizer():
  """Locked for the first 2 updates (bit for bit, and the rest trains exactly as with a
  permanent lock), then trained; the locked group's Adam starts at the unlock."""
  until = 2
  config = helpers.tiny_config(**{"optimizer.frozen": VISION,
                                  "optimizer.frozen_until_step": until})
  _, before, after_lock, _ = run_steps(config, until)
  _, _, permanent, _ = run_steps(helpers.tiny_config(**{"optimizer.frozen": VISION}), until)
  old, new = flat(before.params), flat(after_lock.params)
  for k, v in flat(permanent.params).items():
    np.testing.assert_allclose(new[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    if k.startswith("vision/"):
      assert np.array_equal(old[k], new[k])
  _, _, later, _ = run_steps(config, until + 1)
  assert not np.array_equal(flat(later.params)["vision/patch_embed/kernel"],
                            old["vision/patch_embed/kernel"])
  counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(later.opt_state)[0]
            if param_groups.path_name(p).endswith("count")]
  assert sorted(set(counts)) == [1, until + 1]  # the locked group's Adam: one update


def test_frozen_and_layer_decay_checks():
  params = {"vision": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(2)}}
  config = helpers.tiny_config(**{"optimizer.frozen": "visio/.*"})
  assert "matches no parameter" in optimizer_lib.check(config, params)[0]
  config = helpers.tiny_config(**{"optimizer.frozen": ".*"})
  assert "locks every parameter" in optimizer_lib.check(config, params)[0]
  for decay in (0.0, 1.5):
    config = helpers.tiny_config(**{"optimizer.layer_decay": decay})
    assert "optimizer.layer_decay" in optimizer_lib.check(config, params)[0]
  config = helpers.tiny_config(**{"optimizer.frozen": "vision/.*"})
  assert optimizer_lib.check(config, params) == []


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_layer_decay_scales_each_layer_update(name):
  """The second update with decay d against d = 1, on the same gradients: layer i of a scanned
  stack of L moves by d^(L - i) times as much, the embeddings by d^(L + 1), heads by 1."""
  decay = 0.5
  config = helpers.tiny_config()
  params = jax.device_get(helpers.step_setup(config, 1)[1].params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), 2 * len(leaves))
  grads = [treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(
      keys[i::2], leaves)]) for i in range(2)]
  updates = {}
  for d in (decay, 1.0):
    config = helpers.tiny_config(**{"optimizer.name": name, "optimizer.layer_decay": d,
                                    "optimizer.warmup_steps": 0})
    opt = optimizer_lib.make_optimizer(config)
    state = opt.init(params)
    for g in grads:  # the second update, with moments; the same parameters (weight decay)
      u, state = jax.jit(opt.update)(g, state, params)
    updates[d] = flat(u)
  depth = config.model.vision.depth
  text_depth = config.model.text.num_uni_layers
  ratio = lambda k: updates[decay][k] / updates[1.0][k]
  for i in range(depth):
    np.testing.assert_allclose(ratio("vision/encoder/layers/mlp/fc1/dense/kernel")[i],
                               decay ** (depth - i), rtol=1e-6)
    np.testing.assert_allclose(ratio("vision/encoder/layers/ln_mlp/norm/scale")[i],
                               decay ** (depth - i), rtol=1e-6)
  for i in range(text_depth):
    np.testing.assert_allclose(ratio("unimodal/decoder/layers/self_attn/query/dense/kernel")[i],
                               decay ** (text_depth - i), rtol=1e-6)
  for embedding in ("vision/patch_embed/kernel", "vision/pos_embed"):
    np.testing.assert_allclose(ratio(embedding), decay ** (depth + 1), rtol=1e-6)
  for embedding in ("token_embed/embedding", "unimodal/pos_embed"):
    np.testing.assert_allclose(ratio(embedding), decay ** (text_depth + 1), rtol=1e-6)
  for head in ("text_proj/dense/kernel", "multimodal/decoder/layers/mlp/fc1/dense/kernel",
               "vision/ln_post/norm/scale"):
    np.testing.assert_allclose(ratio(head), 1.0, rtol=1e-6)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_float64_reference(warmup):
  """The EMA after each of 10 updates against float64 NumPy applied to the parameters."""
  decay, steps = 0.9, 10
  config = helpers.tiny_config(**{"optimizer.ema_decay": decay, "optimizer.ema_warmup": warmup})
  rt, state = helpers.step_setup(config, 1)
  ema = {k: v.astype(np.float64) for k, v in flat(jax.device_get(state.params)).items()}
  with rt.activate():
    step = rt.jit_train_step()
    for t in range(steps):
      state, _ = step(state, rt.global_batch(helpers.synthetic_batch(config, t)))
      d = min(decay, (1 + t) / (10 + t)) if warmup else decay
      params = flat(jax.device_get(state.params))
      ema = {k: d * e + (1 - d) * params[k].astype(np.float64) for k, e in ema.items()}
  got = flat(jax.device_get(state.ema_params))
  for k, e in ema.items():
    np.testing.assert_allclose(got[k], e, rtol=1e-5, atol=1e-6, err_msg=k)


def test_ema_and_delayed_lock_resume_exactly(tmp_path, data_dir):
  """SIGTERM at step 7 and a restart reproduce the uninterrupted run bit for bit: losses,
  parameters and their EMA, with the image tower locked until step 6 (optimizer state with
  MaskedNode leaves and a conditional optimizer, checkpointed and restored)."""
  flags = ("--config.total_steps=10", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=5", "--config.eval_every_steps=0",
           "--config.optimizer.ema_decay=0.9", "--config.optimizer.ema_warmup=True",
           "--config.optimizer.frozen=vision/.*", "--config.optimizer.frozen_until_step=6")
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  helpers.run("mmjax.train", whole, data_dir, *flags)
  helpers.run("mmjax.train", resumed, data_dir, *flags, expect=42,
              env={"MMJAX_DEBUG_SIGTERM_AT_STEP": "7"})
  assert "at step 7" in helpers.run("mmjax.train", resumed, data_dir, *flags).stdout
  losses = lambda w: [m["loss"] for m in helpers.metrics(w)]
  assert losses(whole) == losses(resumed)
  config = helpers.tiny_config()
  rt = helpers.runtime.build(config, jax.devices()[:1], params_only=True)
  restored = {}
  for workdir in (whole, resumed):
    checkpointer = checkpoint.Checkpointer(workdir, config)
    restored[workdir] = [flat(jax.device_get(checkpointer.restore_params(
        10, rt.abstract_state, ema=ema))) for ema in (False, True)]
    checkpointer.close()
  for a, b in zip(restored[whole], restored[resumed]):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  params, ema = restored[whole]
  assert any(not np.array_equal(params[k], ema[k]) for k in params)


def test_patch_dropout_keeps_a_fresh_subset_per_example():
  tokens = jnp.arange(2 * (1 + 16) * 3, dtype=jnp.float32).reshape(2, 17, 3)
  rng = jax.random.key(3)
  kept = vit.drop_patches(tokens, rng, 0.5, num_prefix=1)
  assert kept.shape == (2, 1 + 8, 3)
  np.testing.assert_array_equal(kept[:, 0], tokens[:, 0])  # the class token stays
  rows = [set(map(tuple, np.asarray(kept[b, 1:]))) for b in range(2)]
  for b in range(2):  # distinct tokens of that example, none repeated
    assert len(rows[b]) == 8 and rows[b] <= set(map(tuple, np.asarray(tokens[b, 1:])))
  order = lambda b: sorted(int(t[0]) // 3 for t in np.asarray(kept[b, 1:]))
  assert [o - 17 for o in order(1)] != order(0)  # each example its own subset
  np.testing.assert_array_equal(vit.drop_patches(tokens, rng, 0.5, 1), kept)  # same key
  assert not np.array_equal(vit.drop_patches(tokens, jax.random.key(4), 0.5, 1), kept)
  assert vit.drop_patches(tokens, rng, 0.75).shape == (2, 4, 3)


def test_patch_dropout_in_training_only_and_exact_under_accumulation():
  """The train loss with dropout differs from the full one and is a function of (seed,
  step); evaluation embeddings never drop; gradient accumulation (the embedding pass and
  the re-run see the same patches) runs."""
  one = {"mesh.shape": (1, 1, 1)}
  config = helpers.tiny_config(**{"model.patch_dropout": 0.5, **one})
  batch = helpers.synthetic_batch(config)
  loss, _, grads, _ = helpers.objective_grads(config, batch, step=3)
  again, _, _, _ = helpers.objective_grads(config, batch, step=3)
  other, _, _, _ = helpers.objective_grads(config, batch, step=4)
  full, _, _, _ = helpers.objective_grads(helpers.tiny_config(**one), batch, step=3)
  assert loss == again and loss != other and loss != full
  accumulated = helpers.tiny_config(**{"model.patch_dropout": 0.5, "grad_accum_steps": 2,
                                       **one})
  loss2, _, grads2, _ = helpers.objective_grads(accumulated, batch, step=3)
  assert np.isfinite(loss2) and loss2 != full
  rt, state = helpers.step_setup(config, 1)
  with rt.activate():
    images = jnp.asarray(batch["image"])
    a = rt.model.apply({"params": state.params}, images, method="encode_image")[0]
    b = rt.model.apply({"params": state.params}, images, method="encode_image")[0]
  np.testing.assert_array_equal(a, b)


def test_warm_start_loads_by_rules_resizes_positions_and_names_mismatches(tmp_path):
  source_config = helpers.tiny_config(**{"mesh.shape": (1, 1, 1)})
  _, source = helpers.step_setup(source_config, 1)
  saver = checkpoint.Checkpointer(str(tmp_path), source_config)
  saver.save(0, source, source_config)
  saver.close()
  stored = flat(jax.device_get(source.params))
  size = source_config.data.image_size + source_config.model.patch_size  # a larger grid
  config = helpers.tiny_config(**{
      "mesh.shape": (1, 1, 1), "data.image_size": size, "seed": 1,
      "init.checkpoint": str(tmp_path),
      "init.rules": ("multimodal/.*=", "unimodal/ln_cls/(.*)=unimodal/ln_cls/\\1")})
  _, fresh = helpers.step_setup(config, 1)
  params, table = warm_start.initial_params(config, fresh.params)
  got, init = flat(jax.device_get(params)), flat(jax.device_get(fresh.params))
  for k, v in got.items():
    if k.startswith("multimodal/"):
      assert np.array_equal(v, init[k])
      assert not k.endswith("kernel") or not np.array_equal(v, stored[k])
    elif k == "vision/pos_embed":
      assert v.shape == init[k].shape != stored[k].shape
    else:
      assert np.array_equal(v, stored[k]), k
  assert "resized  vision/pos_embed" in table and "fresh    multimodal/decoder" in table
  num_fresh = sum(k.startswith("multimodal/") for k in got)
  assert table.splitlines()[0].endswith(
      f"{len(got) - num_fresh - 1} loaded, 1 resized, {num_fresh} fresh")
  wider = helpers.tiny_config(**{"mesh.shape": (1, 1, 1), "init.checkpoint": str(tmp_path),
                                 "model.embed_dim": 24})
  _, other = helpers.step_setup(wider, 1)
  with pytest.raises(errors.ConfigError, match=r"parameter image_proj/dense/kernel has shape "
                     r"\(32, 24\) but its source image_proj/dense/kernel has \(32, 16\)"):
    warm_start.initial_params(wider, other.params)


def save_params(workdir: str, config, seed: int) -> dict[str, np.ndarray]:
  config = helpers.override(config, **{"seed": seed, "mesh.shape": (1, 1, 1)})
  _, state = helpers.step_setup(config, 1)
  saver = checkpoint.Checkpointer(workdir, config)
  saver.save(3, state, config)
  saver.close()
  return flat(jax.device_get(state.params))


def test_interpolate_mixes_two_checkpoints_and_refuses_other_architectures(tmp_path):
  a, b, out = (str(tmp_path / n) for n in ("a", "b", "out"))
  pa, pb = save_params(a, helpers.tiny_config(), 0), save_params(b, helpers.tiny_config(), 1)
  proc = helpers.call([sys.executable, "-m", "mmjax.interpolate", f"--a={a}", f"--b={b}",
                       "--alpha=0.25", f"--out={out}"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  step, got = warm_start.read_params(out)
  assert step == 0 and set(got) == set(pa)
  for k, v in got.items():
    want = 0.75 * pa[k].astype(np.float64) + 0.25 * pb[k].astype(np.float64)
    np.testing.assert_array_equal(v, want.astype(np.float32), err_msg=k)
  other = str(tmp_path / "other")
  save_params(other, helpers.tiny_config(**{"model.embed_dim": 24}), 0)
  proc = helpers.call([sys.executable, "-m", "mmjax.interpolate", f"--a={a}", f"--b={other}",
                       f"--out={tmp_path / 'mixed'}"])
  line = helpers.usage_error(proc, "mmjax.interpolate")
  assert "image_proj/dense/kernel has shape (32, 16) in --a and (32, 24) in --b" in line
  assert not os.path.exists(tmp_path / "mixed")


@pytest.fixture(scope="module")
def clip_tiny(tmp_path_factory):
  """A two-tower CLIP checkpoint (configs/pretrained.py:openai_tiny, fresh weights) as
  `mmjax.convert` would write it: (work directory, its parameters)."""
  workdir = str(tmp_path_factory.mktemp("clip_tiny"))
  return workdir, save_params(workdir, pretrained.get_config("openai_tiny"), 0)


def test_export_ema_writes_the_moving_average(tmp_path, clip_tiny):
  """`mmjax.export --ema`: the open_clip tensors of a checkpoint whose EMA is half its
  parameters are half the plain export's; a checkpoint without an EMA is one line."""
  config = helpers.override(pretrained.get_config("openai_tiny"),
                            **{"optimizer.ema_decay": 0.9, "mesh.shape": (1, 1, 1)})
  _, state = helpers.step_setup(config, 1)
  state = state.replace(ema_params=jax.tree.map(lambda x: x * 0.5, state.params))
  workdir = str(tmp_path / "ema")
  saver = checkpoint.Checkpointer(workdir, config)
  saver.save(3, state, config)
  saver.close()
  plain, ema = str(tmp_path / "plain"), str(tmp_path / "ema_out")
  export.export_weights("openclip", workdir, None, plain)
  proc = helpers.call([sys.executable, "-m", "mmjax.export", "--to=openclip", "--ema",
                       f"--workdir={workdir}", f"--out={ema}"])
  assert proc.returncode == 0 and "the parameters' EMA" in proc.stdout, proc.stderr[-2000:]
  want = files.load_state_dict(os.path.join(plain, "open_clip_model.safetensors"))
  got = files.load_state_dict(os.path.join(ema, "open_clip_model.safetensors"))
  assert set(got) == set(want) and any(np.any(v != 0) for v in want.values())
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v * 0.5, err_msg=k)
  out = str(tmp_path / "none")
  proc = helpers.call([sys.executable, "-m", "mmjax.export", "--to=openclip", "--ema",
                       f"--workdir={clip_tiny[0]}", f"--out={out}"])
  assert "no EMA" in helpers.usage_error(proc, "mmjax.export") and not os.path.exists(out)


def test_lit_preset_trains_the_text_tower_on_a_locked_clip_image_tower(tmp_path, data_dir,
                                                                       clip_tiny):
  """The guide's LiT command on the tiny preset: warm start table, image tower unchanged."""
  source, stored = clip_tiny
  workdir = str(tmp_path / "lit")
  out = helpers.run("mmjax.train", workdir, data_dir, f"--config.init.checkpoint={source}",
                    "--config.total_steps=2", "--config.eval_every_steps=0",
                    config="configs/finetune.py:lit,openai_tiny").stdout
  assert f"Warm start from {source} step 3: {len(stored)} loaded, 0 resized, 0 fresh" in out
  _, trained = warm_start.read_params(workdir)
  image = [k for k in stored if k.startswith(("vision/", "image_proj/"))]
  assert image and all(np.array_equal(trained[k], stored[k]) for k in image)
  assert not np.array_equal(trained["text_proj/dense/kernel"], stored["text_proj/dense/kernel"])


def test_coca_from_clip_preset_warm_starts_and_unlocks_the_image_tower(tmp_path, data_dir,
                                                                       clip_tiny):
  """The guide's CoCa-from-CLIP command on the tiny preset: the ViT and the unimodal decoder
  come from the CLIP, the image tower is locked for step 1 and trained after."""
  source, stored = clip_tiny
  workdir = str(tmp_path / "coca")
  out = helpers.run("mmjax.train", workdir, data_dir, f"--config.init.checkpoint={source}",
                    "--config.total_steps=2", "--config.eval_every_steps=0",
                    config="configs/finetune.py:coca_from_clip,coca_tiny").stdout
  assert "loaded   unimodal/decoder" in out and "fresh    multimodal/decoder" in out
  assert "resized  unimodal/pos_embed" in out
  _, trained = warm_start.read_params(workdir)
  assert not np.array_equal(trained["vision/patch_embed/kernel"],
                            stored["vision/patch_embed/kernel"])  # unlocked after step 1
