"""Weights in and out (mmjax.convert, mmjax.export) against the reference implementations.

On real photos (scikit-image's) and real sentences, mmjax's image embeddings, text
embeddings and logits are within 1e-4 (max |difference| / max |reference|, float32) of
open_clip's and transformers' own forward, in both directions: weights made by torch and
imported, and weights made by mmjax and exported (loaded back with strict=True). Import then
export gives back every original tensor bit for bit (names, shapes, dtypes, values); export
then import gives back the parameters bit for bit. Tiny presets here; every full-size preset
with random weights under `-m slow`. The reference implementations are the `reference`
extra (pip install -e '.[reference]'): those tests skip without it. Untrusted pickles and
bad input need no extra for the parts that do not read torch files.
"""
import os
import json
import pickle
import re
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import helpers
from configs import openclip as openclip_configs
from configs import pretrained
from mmjax import decode, errors, models
from mmjax.convert import files, importer, openclip, two_tower
from mmjax.data import tokenizer as tokenizer_lib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random models only: nothing is downloaded
TOLERANCE = 1e-4
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SENTENCES = ("a photo of an astronaut in a white suit", "a cup of coffee on a saucer",
             "a tabby cat looking up", "a rocket on its launch pad at Cape Canaveral!")
TINY = [("openai_tiny", "openclip"), ("openclip_tiny", "openclip"), ("openclip_tiny", "hf"),
        ("siglip_tiny", "hf")]
FULL = [(p, f) for p in ("openai_vit_b32", "openai_vit_b16", "openai_vit_l14",
                         "openai_vit_l14_336", "openclip_vit_b32") for f in ("openclip", "hf")]
FULL += [("siglip_b16_224", "hf"), ("siglip_so400m_14_384", "hf")]


@pytest.fixture(scope="module")
def reference():
  """(torch, open_clip, transformers), or the test is skipped."""
  torch = pytest.importorskip("torch", reason="the reference extra: pip install -e "
                                               "'.[reference]'")
  return (torch, pytest.importorskip("open_clip"), pytest.importorskip("transformers"))


@pytest.fixture(scope="module")
def siglip_vocab(tmp_path_factory):
  """A SentencePiece model with SigLIP's special ids (pad 0, </s> 1, <unk> 2, no BOS),
  trained on a few sentences: SigLIP's own 32k model cannot be downloaded here."""
  import sentencepiece as spm
  path = str(tmp_path_factory.mktemp("siglip") / "spiece.model")
  texts = [t.lower() for t in SENTENCES] + ["a photo of a dog", "an image of a red car",
                                             "two people walking on a beach at sunset"] * 4
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=path[:-len(".model")], vocab_size=80,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
      unk_piece="<unk>", model_type="unigram", hard_vocab_limit=False, minloglevel=2,
      num_threads=1)
  return path


def rel(ours: np.ndarray, ref: np.ndarray) -> float:
  """max |ours - ref| / max |ref|, in float64."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def photos(size: int) -> np.ndarray:
  """scikit-image's photos, centre-cropped square and resized: uint8 [4, size, size, 3]."""
  from skimage import data
  out = []
  for name in PHOTOS:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    out.append(np.asarray(image.crop((left, top, left + side, top + side)).resize(
        (size, size), Image.BICUBIC)))
  return np.stack(out)


def preset_config(preset: str, spm_path: str | None = None) -> ml_collections.ConfigDict:
  config = pretrained.get_config(preset)
  if config.data.tokenizer.kind == "siglip":
    config = helpers.override(config, **{"data.tokenizer.path": spm_path})
  return config


def torch_model(reference, config, fmt: str, seed: int = 0):
  """A random open_clip CLIP or transformers CLIPModel / SiglipModel of `config`'s
  architecture, every parameter but the logit scale/bias perturbed by N(0, 0.02) (unit
  LayerNorm scales and zero biases would hide swapped entries)."""
  torch, open_clip, transformers = reference
  torch.manual_seed(seed)
  if fmt == "openclip":
    name = f"mmjax_{config.name}"
    open_clip.factory._MODEL_CONFIGS[name] = two_tower.openclip_model_config(config)  # pylint: disable=protected-access
    model = open_clip.create_model(name, pretrained=None)
  else:
    hf = two_tower.hf_config(config)
    if hf["model_type"] == "siglip":
      model = transformers.SiglipModel(transformers.SiglipConfig(
          text_config=hf["text_config"], vision_config=hf["vision_config"]))
    else:
      model = transformers.CLIPModel(transformers.CLIPConfig(
          text_config=hf["text_config"], vision_config=hf["vision_config"],
          projection_dim=hf["projection_dim"]))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "logit" not in name:
        p.add_(torch.randn_like(p) * 0.02)
  return model.eval()


def torch_forward(reference, model, config, fmt: str, images: np.ndarray,
                  tokens: np.ndarray) -> dict[str, np.ndarray]:
  """The reference's own forward: projected embeddings (not normalised) and logits."""
  torch, open_clip, _ = reference
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
  if config.model.image_norm == "clip":
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
  else:
    x = (x - 0.5) / 0.5  # SigLIP's processor: mean = std = 0.5
  t = torch.from_numpy(tokens.astype(np.int64))
  with torch.no_grad():
    if fmt == "openclip":
      image, text, scale = model(x, t)[:3]  # normalised features, exp(logit_scale)
      return dict(image=model.encode_image(x).numpy(), text=model.encode_text(t).numpy(),
                  logits=(scale * image @ text.T).numpy())
    out = model(input_ids=t, pixel_values=x)
    return dict(image=model.get_image_features(pixel_values=x).numpy(),
                text=model.get_text_features(input_ids=t).numpy(),
                logits=out.logits_per_image.numpy())


def mmjax_forward(config, params, images: np.ndarray, tokens: np.ndarray) -> dict:
  model = models.build_model(config)
  v = {"params": params}
  image = np.asarray(model.apply(v, images, method="encode_image")[0])
  text = np.asarray(model.apply(v, tokens, None, method="encode_text"))
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  scale = float(model.apply(v, method="logit_scale"))
  bias = float(model.apply(v, method="logit_bias"))
  return dict(image=image, text=text, logits=scale * norm(image) @ norm(text).T + bias)


def inputs(config) -> tuple[np.ndarray, np.ndarray]:
  tokenizer = tokenizer_lib.get_tokenizer(config)
  return photos(config.model.image_size), tokenizer.encode(SENTENCES, config.data.max_text_len)


def state_dict_of(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
    assert np.array_equal(a[k], b[k]), k


def random_params(config, seed: int = 0):
  """mmjax's own random initialisation, every leaf perturbed as `torch_model`'s."""
  model = models.build_model(config)
  size, length = config.model.image_size, config.data.max_text_len
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(seed), np.zeros((1, size, size, 3), np.uint8),
      np.ones((1, length), np.int32), np.zeros((1,), np.int32))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: np.asarray(x) + (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), params)


def check_import(reference, preset: str, fmt: str, spm_path: str | None) -> dict[str, float]:
  """torch weights -> mmjax: forward parity; export gives back the same tensors."""
  config = preset_config(preset, spm_path)
  model = torch_model(reference, config, fmt)
  original = state_dict_of(model)
  params = two_tower.import_state_dict(original, config, fmt, "test")
  openclip.check_params(params, config)
  images, tokens = inputs(config)
  ours = mmjax_forward(config, params, images, tokens)
  ref = torch_forward(reference, model, config, fmt, images, tokens)
  assert_same_tensors(two_tower.export_state_dict(params, config, fmt), original)
  return {k: rel(ours[k], ref[k]) for k in ref}


def check_export(reference, preset: str, fmt: str, spm_path: str | None) -> dict[str, float]:
  """mmjax weights -> torch (strict load): forward parity; import gives back the params."""
  torch, _, _ = reference
  config = preset_config(preset, spm_path)
  params = random_params(config)
  exported = two_tower.export_state_dict(params, config, fmt)
  back = two_tower.import_state_dict(exported, config, fmt, "test")
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert x.dtype == y.dtype and np.array_equal(x, y)
  del back  # full-size presets: one copy of the weights at a time where possible
  model = torch_model(reference, config, fmt, seed=1)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  del exported
  images, tokens = inputs(config)
  ours = mmjax_forward(config, params, images, tokens)
  ref = torch_forward(reference, model, config, fmt, images, tokens)
  return {k: rel(ours[k], ref[k]) for k in ref}


@pytest.mark.parametrize("preset,fmt", TINY)
@pytest.mark.parametrize("direction", ["import", "export"])
def test_tiny_parity_with_the_reference(reference, siglip_vocab, preset, fmt, direction):
  check = check_import if direction == "import" else check_export
  worst = check(reference, preset, fmt, siglip_vocab)
  print(f"PARITY {preset} {fmt} {direction} " + " ".join(
      f"{k}={v:.2e}" for k, v in worst.items()), flush=True)
  assert max(worst.values()) < TOLERANCE, worst


@pytest.mark.slow
@pytest.mark.parametrize("preset,fmt", FULL)
def test_full_size_parity_with_the_reference(reference, siglip_vocab, preset, fmt):
  """Both directions at full size with random weights; prints the figures RESULTS.md
  records (`-s` to see them)."""
  for direction, check in (("import", check_import), ("export", check_export)):
    worst = check(reference, preset, fmt, siglip_vocab)
    print(f"PARITY {preset} {fmt} {direction} " + " ".join(
        f"{k}={v:.2e}" for k, v in worst.items()), flush=True)
    assert max(worst.values()) < TOLERANCE, (direction, worst)


def test_tokenizers_match_the_references(reference, siglip_vocab, monkeypatch):
  _, open_clip, transformers = reference
  # SiglipTokenizer edits the model's normaliser through sentencepiece's bundled protobuf
  # module, generated for protobuf 7 (sentencepiece 0.2.3; this venv has protobuf 6):
  # transformers' own copy of the same schema does the same edit.
  from transformers.models.siglip import tokenization_siglip
  from transformers.utils import sentencepiece_model_pb2_new
  monkeypatch.setattr(tokenization_siglip, "import_protobuf",
                      lambda *a, **k: sentencepiece_model_pb2_new)
  ours = tokenizer_lib.get_tokenizer(preset_config("siglip_tiny", siglip_vocab))
  theirs = transformers.SiglipTokenizer(vocab_file=siglip_vocab)
  expected = theirs(list(SENTENCES), padding="max_length", max_length=16,
                    truncation=True).input_ids
  assert ours.encode(SENTENCES, 16).tolist() == expected
  clip = tokenizer_lib.get_tokenizer(pretrained.get_config("openai_tiny"))
  assert clip.encode(SENTENCES, 77).tolist() == open_clip.tokenize(list(SENTENCES)).tolist()


def test_coca_round_trip_through_open_clip_keeps_tensors_and_greedy_captions(reference,
                                                                             tmp_path):
  """open_clip CoCa -> mmjax -> open_clip: the same tensors; open_clip loads the export
  (strict) and its greedy captions are mmjax's, token for token."""
  torch, open_clip, _ = reference
  config = openclip_configs.get_config("coca_tiny")
  original = state_dict_of(openclip.openclip_coca("coca_tiny", perturb=True))
  params = openclip.convert_state_dict(original, config)
  exported = openclip.export_state_dict(params, config)
  assert_same_tensors(exported, original)
  folder = tmp_path / "coca"
  folder.mkdir()
  files.save_safetensors(exported, str(folder / "open_clip_model.safetensors"))
  (folder / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": openclip.openclip_model_config_of(config)}))
  assert openclip.openclip_model_config_of(config) == openclip_configs.openclip_model_config(
      "coca_tiny")
  loaded = open_clip.create_model(f"local-dir:{folder}").eval()
  images = photos(config.model.image_size)
  new = 8
  ids = dict(bos_id=49406, eos_id=49407, pad_id=0, max_new_tokens=new)
  mm = np.asarray(decode.make_captioner(models.build_model(config), decode.DecodeConfig(
      strategy="greedy", **ids))(params, images, jax.random.key(0)))
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
  x = (x - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
      open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    oc = loaded.generate(x, seq_len=new + 1, generation_type="top_k", top_k=1)[:, 1:].numpy()
  n = min(mm.shape[1], oc.shape[1]) - 1  # open_clip forces its last token to EOS
  assert len(np.unique(mm[:, :n])) > 2 and np.array_equal(mm[:, :n], oc[:, :n])


# --- untrusted files and bad input ------------------------------------------------------------
class RunsCode:
  """Unpickling this calls exec: what a malicious checkpoint does."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_pickle_that_would_run_code_is_refused(reference, tmp_path):
  marker = str(tmp_path / "executed")
  path = str(tmp_path / "evil.bin")
  with open(path, "wb") as f:
    pickle.dump({"visual.proj": RunsCode(marker)}, f)
  with open(str(tmp_path / "plain.pkl"), "wb") as f:  # the same pickle does run code
    pickle.dump(RunsCode(marker + "_control"), f)
  with open(str(tmp_path / "plain.pkl"), "rb") as f:
    pickle.load(f)
  assert os.path.exists(marker + "_control")
  with pytest.raises(errors.UsageError, match="refused.*safetensors") as e:
    files.load_state_dict(path)
  assert "\n" not in str(e.value) and not os.path.exists(marker)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
  """Missing file, unknown format, another architecture, torch missing: UsageError naming
  the problem and the fix; --out never appears."""
  out = str(tmp_path / "out")
  config = pretrained.get_config("openai_tiny")
  cases = {"no such file": str(tmp_path / "missing.safetensors")}
  (tmp_path / "weights.npz").write_bytes(b"x")
  cases["unknown format"] = str(tmp_path / "weights.npz")
  files.save_safetensors({"text_decoder.ln_final.weight": np.ones(4, np.float32)},
                         str(tmp_path / "coca.safetensors"))
  cases["CoCa state dict"] = str(tmp_path / "coca.safetensors")
  files.save_safetensors({"visual.proj": np.ones((4, 4), np.float32)},
                         str(tmp_path / "partial.safetensors"))
  cases["another architecture"] = str(tmp_path / "partial.safetensors")
  (tmp_path / "weights.pt").write_bytes(b"x")
  for match, path in cases.items():
    with pytest.raises(errors.UsageError, match=match):
      importer.import_weights("openclip", path, config, out)
    assert not os.path.exists(out)
  monkeypatch.setitem(sys.modules, "torch", None)  # the extra not installed
  with pytest.raises(errors.UsageError, match=r"needs torch.*mmjax\[reference\]"):
    importer.import_weights("openclip", str(tmp_path / "weights.pt"), config, out)
  assert not os.path.exists(out)


def test_command_line_bad_input_exits_2_with_one_line(tmp_path):
  out = str(tmp_path / "out")
  proc = helpers.call([sys.executable, "-m", "mmjax.convert", "--from=hf",
                       f"--checkpoint={tmp_path / 'nowhere'}", f"--out={out}"])
  line = helpers.usage_error(proc, "mmjax.convert")
  assert "no such folder" in line and not os.path.exists(out)
  proc = helpers.call([sys.executable, "-m", "mmjax.export", "--to=hf",
                       f"--workdir={tmp_path}", f"--out={out}"])
  assert "no checkpoint" in helpers.usage_error(proc, "mmjax.export")
  assert not os.path.exists(out)


# --- the guide's commands -------------------------------------------------------------------
GUIDE_SHIM = """
python() {
  local args=()
  for a in "$@"; do
    [[ $a == configs/pretrained.py:openclip_vit_b32 ]] && a=configs/pretrained.py:openclip_tiny
    [[ $a == --config.total_steps=* ]] && a=--config.total_steps=2
    args+=("$a")
  done
  if [[ $2 == mmjax.train || $2 == mmjax.evaluate ]]; then
    args+=(--config.data_dir="$DATA_DIR" --config.compilation_cache_dir="$XLA_CACHE"
           --config.batch_size=8 --config.log_every_steps=1 --config.checkpoint_every_steps=2
           --config.eval_every_steps=0 --config.eval_batch_size=16
           --config.evals.zeroshot.num_examples=16 --config.evals.seen_classes.num_examples=16
           --config.evals.retrieval.num_examples=16 --config.evals.linear_probe.num_examples=0)
  fi
  "$VENV_PYTHON" "${args[@]}"
}
"""


def guide_block() -> str:
  with open(os.path.join(helpers.REPO, "docs", "guide.md")) as f:
    section = f.read().split("## 10. Start from pretrained weights", 1)[1].split("\n## ", 1)[0]
  (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
  return block


@pytest.mark.slow  # seven commands: minutes on a CPU
def test_guide_commands_run_as_written(reference, siglip_vocab, tmp_path, data_dir):
  """docs/guide.md §10 under bash, HOME a scratch folder holding a random SigLIP folder
  (siglip_tiny's architecture, transformers' save_pretrained + a SigLIP-style
  spiece.model) and a random open_clip state dict (`openclip_vit_b32` runs as
  `openclip_tiny`); `pip install` is skipped, the rest runs as written. Then: the exported
  SigLIP has the original's names, shapes and dtypes (values fine-tuned), the open_clip one
  is the original bit for bit."""
  torch, _, _ = reference
  home = tmp_path / "home"
  home.mkdir()
  siglip = torch_model(reference, preset_config("siglip_tiny", siglip_vocab), "hf")
  siglip.save_pretrained(str(home / "siglip-base-patch16-224"))
  with open(siglip_vocab, "rb") as f:
    (home / "siglip-base-patch16-224" / "spiece.model").write_bytes(f.read())
  clip = state_dict_of(torch_model(reference, pretrained.get_config("openclip_tiny"),
                                   "openclip"))
  files.save_safetensors(clip, str(home / "ViT-B-32.safetensors"))
  block = "\n".join(line for line in guide_block().splitlines()
                    if not line.startswith("pip install"))
  proc = helpers.call(["bash", "-euo", "pipefail", "-c", GUIDE_SHIM + block],
                      env={"HOME": str(home), "VENV_PYTHON": sys.executable,
                           "DATA_DIR": data_dir, "XLA_CACHE": helpers.CACHE_DIR,
                           "HF_HUB_OFFLINE": "1"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "SiglipModel" in proc.stdout
  original = files.load_state_dict(str(home / "siglip-base-patch16-224" / "model.safetensors"))
  tuned = files.load_state_dict(str(home / "siglip_finetuned" / "model.safetensors"))
  assert {k: (v.shape, v.dtype) for k, v in tuned.items()} == {
      k: (v.shape, v.dtype) for k, v in original.items()}
  assert not np.array_equal(tuned["text_model.head.weight"], original["text_model.head.weight"])
  with open(siglip_vocab, "rb") as f:
    assert (home / "siglip_finetuned" / "spiece.model").read_bytes() == f.read()
  assert_same_tensors(files.load_state_dict(
      str(home / "clip_b32_openclip" / "open_clip_model.safetensors")), clip)
