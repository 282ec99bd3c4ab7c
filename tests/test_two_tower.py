"""mmjax.models.two_tower and configs/pretrained.py: public parameter totals, training with the
CLIP and SigLIP objectives, FLOPs against XLA, end-of-text pooling, position resizing, and
train + evaluate through the commands. Parity with open_clip / transformers:
tests/test_convert.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import pretrained
from mmjax import aot, objectives, runtime, summary
from mmjax.models import two_tower

# OpenAI CLIP's parameter totals (the released checkpoints' numel, as open_clip counts them).
OPENAI_TOTALS = {"openai_vit_b32": 151_277_313, "openai_vit_b16": 149_620_737,
                 "openai_vit_l14": 427_616_513, "openai_vit_l14_336": 427_944_193}
# Tokenizer-free tiny configs (a SentencePiece trained on the shapes texts) for tests that
# run without the reference extra (OpenAI's BPE comes from the open_clip package).
NO_BPE = {"data.tokenizer.kind": "sentencepiece", "data.tokenizer.vocab_size": 64}


@pytest.mark.parametrize("preset", sorted(OPENAI_TOTALS))
def test_openai_presets_have_the_released_parameter_totals(preset):
  s = summary.summarize(pretrained.get_config(preset))
  assert s["params_total"] == OPENAI_TOTALS[preset]
  assert s["params_total"] == s["params_image_tower"] + s["params_text_tower"] + 1  # + scale


@pytest.mark.parametrize("preset", ["openai_tiny", "siglip_tiny"])
def test_trains_with_its_objective(preset):
  """CLIP presets train with the coca objective without captions, SigLIP ones with the
  sigmoid loss and its learned bias; every parameter gets a gradient."""
  config = helpers.override(pretrained.get_config(preset),
                            **NO_BPE, **{"batch_size": 8, "mesh.shape": (1, 1, 1)})
  assert (config.loss.name, config.loss.caption_weight) == (
      "siglip" if preset.startswith("siglip") else "coca", 0.0)
  loss, aux, grads, _ = helpers.objective_grads(config, helpers.synthetic_batch(config))
  assert np.isfinite(loss) and aux["contrastive_loss"] == pytest.approx(loss)
  zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(g)]
  assert not zero


def test_captioning_is_refused():
  config = helpers.override(pretrained.get_config("openai_tiny"), **NO_BPE)
  model = runtime.build(config, jax.devices()[:1], params_only=True).model
  batch = helpers.synthetic_batch(config)
  with pytest.raises(ValueError, match="loss.caption_weight=0"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), batch["image"], batch["text"],
                                      batch["text_type"], with_captions=True))


def test_end_of_text_is_the_last_real_token():
  """OpenAI's BPE: EOT (49407) is the largest id, so CLIP's argmax finds it; id 0 ('!') is
  also open_clip's padding and may appear inside a text."""
  text = np.array([[49406, 0, 320, 49407, 0, 0], [49406, 320, 1125, 539, 0, 49407]], np.int32)
  assert list(two_tower.end_of_text(jnp.asarray(text))) == list(text.argmax(1)) == [3, 5]


def test_position_embedding_resizes_on_the_grid():
  """A field linear on the 4x4 grid stays linear on 6x6 (bicubic reproduces linear
  functions away from the border); the class-token row is kept."""
  y, x = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
  pos = np.concatenate([np.full((1, 2), 7.0), np.stack([x, y], -1).reshape(16, 2)])
  out = two_tower.resize_position_embedding(pos.astype(np.float32), 1, 6)
  assert out.shape == (37, 2) and out[0].tolist() == [7.0, 7.0]
  grid = out[1:].reshape(6, 6, 2)
  assert np.all(np.diff(grid[2:4, :, 0], axis=1) > 0) and np.all(np.diff(grid[:, 2:4, 1], axis=0) > 0)
  inner = grid[2:4, 2:4, 0]  # x doubles as 4 -> 6 positions: spacing 4/6 of the old
  assert np.allclose(np.diff(inner, axis=1), 4 / 6, atol=1e-5)
  assert two_tower.resize_position_embedding(pos, 1, 4) is pos


def test_flops_per_example_match_compiled_xla():
  """The matmul count lands a little below XLA's (which also counts norms, activations,
  softmax and the loss); unrolled so XLA counts every layer."""
  config = helpers.override(pretrained.get_config("openai_tiny"),
                            **NO_BPE, **{"model.scan_layers": False, "loss.sharded": False,
                                         "batch_size": 8})
  rt = runtime.build(config, jax.devices()[:1], params_only=True)
  objective = objectives.build(config, rt.model, mesh=None)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rt.abstract_state)
  lowered = jax.jit(jax.grad(lambda p, b: objective.loss(p, b)[0])).lower(
      params, runtime.batch_spec(config))
  cost = lowered.compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  ours = summary.model_flops_per_example(config) * config.batch_size
  assert 0.85 * xla < ours <= xla


def test_train_then_evaluate_a_two_tower_model(tmp_path, data_dir):
  """The commands on configs/pretrained.py:openai_tiny: 4 steps, then mmjax.evaluate's
  zero-shot, retrieval and linear-probe numbers equal the trainer's final ones."""
  workdir = str(tmp_path / "clip")
  overrides = [f"--config.{k}={v}" for k, v in NO_BPE.items()] + [
      "--config.total_steps=4", "--config.batch_size=8", "--config.checkpoint_every_steps=4",
      "--config.eval_every_steps=4", "--config.log_every_steps=2"]
  config = f"{helpers.REPO}/configs/pretrained.py:openai_tiny"
  helpers.run("mmjax.train", workdir, data_dir, *overrides, config=config)
  trained = [m for m in helpers.metrics(workdir) if "linear_probe/shapes_labels/top1" in m][-1]
  helpers.run("mmjax.evaluate", workdir, data_dir, *overrides, config=config)
  with open(os.path.join(workdir, "eval", "step_4.json")) as f:
    evaluated = json.load(f)
  for key in ("zeroshot/shapes_labels_unseen/top1", "retrieval/shapes_captions/i2t_r1",
              "linear_probe/shapes_labels/top1"):
    assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key


@pytest.mark.slow
def test_compiles_ahead_of_time_for_a_tpu(capsys):
  config = helpers.override(pretrained.get_config("openai_tiny"), **NO_BPE)
  status = aot.run(config, "openai_tiny", "v4-8", 1, ("train",), 0, False)
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert status == 0 and report["fits"] and report["compiled_flops_per_device"] > 0
