"""open_clip CoCa -> mmjax: forward parity of converted weights, tokenizer ids, param count,
and a converted checkpoint that evaluates and fine-tunes.

Tests that need torch/open_clip skip without them; create their venv with
benchmarks/setup_openclip.sh and run
  HF_HUB_OFFLINE=1 PYTHONPATH=. /work/venv-oc/bin/python -m pytest tests/test_openclip.py
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import openclip as openclip_configs
from conftest import CACHE_DIR, REPO
from mmjax import checkpoint, evaluate, models, runtime, train
from mmjax.convert import openclip as convert
from mmjax.tokenizers import openclip as openclip_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only: never touch the network
TOLERANCE = 1e-4  # max abs difference, float32 on both sides
CAPTIONS = [
    "a red circle to the left of a blue square",
    "Two  small GREEN triangles &amp; a café sign!",
    "a photo of a dog.",
    " ".join(["a very long caption that is truncated"] * 20),  # fills the context: no pad
]


@pytest.fixture(scope="module")
def oc():
  pytest.importorskip("torch", reason="open_clip parity needs torch (benchmarks/"
                                      "setup_openclip.sh creates a venv with it)")
  return pytest.importorskip("open_clip", reason="needs open-clip-torch==3.3.0 (benchmarks/"
                                                 "setup_openclip.sh)")


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def parity(oc, variant: str, legacy_mask: bool, batch: int = 2) -> dict[str, float]:
  """Max abs differences of image/text embeddings and caption logits, same inputs."""
  import torch
  torch_model = convert.openclip_coca(variant, perturb=True, legacy_mask=legacy_mask).eval()
  config = openclip_configs.get_config(f"{variant},legacy_mask={int(legacy_mask)}")
  params = convert.convert_state_dict(
      {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, config)
  convert.check_params(params, config)
  model = models.build_model(config)

  size, length = config.data.image_size, config.data.max_text_len
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)  # taken as [-1, 1]
  text = openclip_tokenizer.OpenClipTokenizer().encode(
      [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], length)
  # one unpadded row
  text[-1] = openclip_tokenizer.OpenClipTokenizer().encode(CAPTIONS[-1:], length)[0]
  out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, np.zeros(batch, np.int32)))(
      params, images, text)

  mean = np.asarray(oc.OPENAI_DATASET_MEAN, np.float32).reshape(1, 3, 1, 1)
  std = np.asarray(oc.OPENAI_DATASET_STD, np.float32).reshape(1, 3, 1, 1)
  torch_images = torch.from_numpy(((images.transpose(0, 3, 1, 2) + 1) / 2 - mean) / std)
  torch_text = torch.from_numpy(text[:, :-1]).long()  # open_clip's context_length tokens
  with torch.no_grad():
    image_emb, _ = torch_model._encode_image(torch_images, normalize=False)
    text_emb, _ = torch_model._encode_text(torch_text, normalize=False)
    logits = torch_model(torch_images, torch_text)["logits"]
  # open_clip predicts context_length - 1 positions; mmjax one more (see configs/openclip.py).
  assert logits.shape[1] == length - 2 and out["caption_logits"].shape[1] == length - 1
  return {
      "image_emb": float(np.abs(np.asarray(out["image_emb"]) - image_emb.numpy()).max()),
      "text_emb": float(np.abs(np.asarray(out["text_emb"]) - text_emb.numpy()).max()),
      "caption_logits": float(np.abs(np.asarray(out["caption_logits"])[:, :length - 2]
                                     - logits.numpy()).max()),
      "logit_scale": float(abs(float(out["logit_scale"])
                               - float(torch_model.logit_scale.detach().exp()))),
      "torch_params": sum(p.numel() for p in torch_model.parameters()),
      "mmjax_params": num_params(params),
  }


def test_param_count_coca_vit_b32():
  """open_clip's coca_ViT-B-32 has 253.6M parameters (papers.md); no torch needed."""
  config = openclip_configs.get_config("coca_vit_b32")
  count = num_params(runtime.build(config, jax.devices()[:1], params_only=True).abstract_state)
  assert abs(count / 253.6e6 - 1) < 0.005, count


@pytest.mark.parametrize("variant,legacy_mask", [("coca_vit_b32", True), ("coca_tiny", False)])
def test_forward_parity(oc, variant, legacy_mask):
  """B/32 with the legacy CLS mask of the shipped weights; the tiny model (QuickGELU, other
  widths/heads/queries) with the corrected one."""
  diffs = parity(oc, variant, legacy_mask)
  print(variant, diffs)
  assert diffs["torch_params"] == diffs["mmjax_params"]
  for key in ("image_emb", "text_emb", "caption_logits", "logit_scale"):
    assert diffs[key] <= TOLERANCE, (key, diffs)


def test_model_configs_match_open_clip(oc):
  for variant, name in (("coca_vit_b32", "coca_ViT-B-32"), ("coca_vit_l14", "coca_ViT-L-14")):
    assert openclip_configs.openclip_model_config(variant) == oc.get_model_config(name), name


def test_tokenizer_matches_open_clip(oc):
  ours = openclip_tokenizer.OpenClipTokenizer()
  theirs = oc.get_tokenizer("coca_ViT-B-32")  # context_length 76
  got = ours.encode(CAPTIONS, 76)
  np.testing.assert_array_equal(got, theirs(CAPTIONS).numpy())
  assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.vocab_size) == (0, 49406, 49407, 49408)
  assert ours.decode(got[0]) == CAPTIONS[0]


def test_converted_checkpoint_evaluates_and_finetunes(oc, tmp_path, data_dir):
  """CLI conversion of a saved open_clip state dict, then mmjax.evaluate and mmjax.train
  restore it (train resumes at step 0 with the converted weights and a fresh optimizer)."""
  import torch  # noqa: F401
  from safetensors.torch import save_file
  torch_model = convert.openclip_coca("coca_tiny", perturb=True).eval()
  path = str(tmp_path / "open_clip_coca_tiny.safetensors")
  save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, path)
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
      [sys.executable, "-m", "mmjax.convert.openclip", f"--checkpoint={path}",
       f"--config={REPO}/configs/openclip.py:coca_tiny", f"--out={workdir}"],
      cwd=REPO, capture_output=True, text=True,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  config = openclip_configs.get_config("coca_tiny")
  config.unlock()
  config.data_dir = data_dir
  config.compilation_cache_dir = CACHE_DIR
  config.total_steps = 2
  config.eval_every_steps = 0  # evaluated above; keeps the test short
  config.loss.contrastive_weight = 0.0  # caption-only fine-tuning
  config.lock()
  expected = convert.convert_state_dict(
      {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, config)
  step, results = evaluate.evaluate_checkpoint(config, workdir)
  assert step == 0 and "retrieval/shapes_captions/i2t_r1" in results
  rt = runtime.build(config, params_only=True)
  with rt.activate():
    checkpointer = checkpoint.Checkpointer(workdir, config)
    restored = jax.device_get(checkpointer.restore_params(0, rt.abstract_state))
    checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, restored, expected)

  out = train.train_and_evaluate(config, workdir)
  assert np.isfinite(out["loss"]) and out["contrastive_loss"] >= 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0", "2"]
