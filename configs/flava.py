"""FLAVA (arXiv 2112.04482): tiny on the embedded `shapes` data, full at the paper's sizes.

  python -m mmjax.train --config configs/flava.py:tiny --workdir /tmp/mmjax_flava
  python -m mmjax.evaluate --config configs/flava.py:tiny --workdir /tmp/mmjax_flava

Variants:
  tiny  64 px, patch 16 (4 x 4 = 16 patches, as configs/shapes.py), encoders width 64 /
        2 layers, multimodal 1 layer, batch 64, 1800 steps; shapes data. 8 min measured
        on a quiet 2-core CPU, final evaluation included (README, FLAVA).
  full  the paper's sizes: ViT-B/16 at 224 px (768 wide, 12 layers, MLP 3072, 12 heads), a
        text encoder of the same shape, a 6-layer multimodal encoder of width 768; batch
        8192. Data: coco_captions pairs, imagenet2012 images (image-only), coco captions as
        text-only stand-in for CCNews/BookCorpus (mmjax sources are TFDS image datasets).

Data: every source is read as usual (`kind` label/caption) and viewed through its
`modality` ("paired" | "image" | "text"): an image-only view drops the text (all PAD), a
text-only view zeroes the image; batches then carry has_image / has_text / paired flags and
each loss is averaged over the examples it applies to (see mmjax/flava_objectives.py).
`kind` stays label/caption so the shared config validation (mmjax.cli) accepts it.

Objectives (config.flava): MLM (15%, BERT 80/10/10), MIM (BEiT block masking of 40% of the
patches; targets "pixels" = MAE normalised pixels, or "codebook" = nearest centroid of
`codebook_path`), MMM (masked text + masked image through the multimodal encoder, matched
pairs only), ITM (swapped-caption negatives at `itm_negative_rate`), global contrastive
(UniCL; CLIP targets with loss.label_aware=False). `unimodal_steps` > 0 trains only MLM and
MIM for the first steps, then all objectives, in one run.
"""
import importlib.util
import os

import ml_collections

VARIANTS = ("tiny", "full")


def _load_shapes():
  """configs/ is not a package: import configs/shapes.py by path so keys match its helpers."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.py")
  spec = importlib.util.spec_from_file_location("mmjax_configs_shapes", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flava_config(*, mim_min_block: int, unimodal_steps: int) -> ml_collections.ConfigDict:
  f = ml_collections.ConfigDict()
  f.mlm_rate = 0.15  # BERT; selected tokens -> 80% [MASK], 10% random, 10% kept
  f.mim_ratio = 0.4  # BEiT: 75 of 196 patches
  f.mim_min_block = mim_min_block  # BEiT: 16 patches
  f.mim_target = "pixels"  # "pixels" (MAE, no pretrained network) | "codebook"
  f.codebook_path = ""  # .npz with centroids [K, patch**2 * 3] (mim_target="codebook")
  f.codebook_size = 8192  # K; must match the file (8192 = the dVAE's vocabulary)
  f.mim_on_paired = False  # paper: MIM on image-only data; paired images get MMM
  f.itm_negative_rate = 0.1
  f.unimodal_steps = unimodal_steps  # MLM/MIM only before this step, then all objectives
  f.weights = ml_collections.ConfigDict(dict(mlm=1.0, mim=1.0, mmm_text=1.0, mmm_image=1.0,
                                             itm=1.0, contrastive=1.0))  # paper: all 1.0
  return f


def model_config(vision: tuple[int, int, int, int], text: tuple[int, int, int, int],
                 multimodal: tuple[int, int, int, int], embed_dim: int,
                 patch_size: int) -> ml_collections.ConfigDict:
  """(width, layers, mlp_dim, heads) per encoder."""
  enc = lambda w, n, f, h: ml_collections.ConfigDict(dict(width=w, num_layers=n, mlp_dim=f,
                                                          num_heads=h))
  m = ml_collections.ConfigDict()
  m.name = "flava"
  m.image_size = 0  # set from data.image_size
  m.patch_size = patch_size
  w, n, f, h = vision
  m.vision = ml_collections.ConfigDict(dict(width=w, depth=n, mlp_dim=f, num_heads=h))
  m.text = enc(*text)
  m.text.vocab_size = 0  # set from data.tokenizer.vocab_size
  m.multimodal = enc(*multimodal)
  m.embed_dim = embed_dim
  m.logit_scale_init = 1 / 0.07  # paper (clamped at 100)
  m.logit_scale_max = 100.0
  m.activation = "gelu"
  m.dtype = "float32"
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat_policy = "none"
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/flava.py:{arg}: choose one of {VARIANTS}")
  shapes = _load_shapes()
  c = ml_collections.ConfigDict()
  c.preset = "flava"
  c.variant = variant
  c.seed = 0
  c.grad_accum_steps = 1
  c.compilation_cache_dir = "~/.cache/mmjax/jax_compilation_cache"
  # MFU denominator, dense bf16 TFLOP/s per device; 0 = look up the device kind (H100/H200,
  # A100, TPU v4/v5e/v5p/v6e), no MFU metric on unknown devices such as CPUs.
  c.peak_tflops_per_device = 0.0
  c.loss = shapes.loss_config()
  c.loss.caption_weight = 0.0  # no captioning head in FLAVA
  c.mesh = shapes.mesh_config()
  c.checkpoint = shapes.checkpoint_config()
  c.profile = shapes.profile_config()
  c.evals = shapes.evals_config()
  del c.evals["captioning"]  # FLAVA has no captioning decoder

  if variant == "tiny":
    # Measured (README): at 32 px / patch 4 / width 32 / batch 32 the model barely learned
    # in 300-700 steps; 64 px / patch 16 (the CoCa shapes resolution), width 64 and batch
    # 64 (~38 paired examples per contrastive batch) learned faster, and the linear probe
    # needs the longer schedule (600 steps: no clear gain over random features).
    c.batch_size = 64
    c.total_steps = 1800
    c.log_every_steps = 50
    c.checkpoint_every_steps = 600
    c.eval_every_steps = 1800  # the final step only (the evaluation takes ~30 s here)
    c.data_dir = "~/.cache/mmjax/datasets"
    c.data = shapes.data_config(image_size=64, max_text_len=12)
    c.data.tokenizer.vocab_size = 64
    s = c.data.sources
    # Paired views (labels + captions), and unimodal views of the same two datasets.
    s.labels.weight, s.captions.weight = 0.3, 0.3
    s.images = shapes.source_config("shapes/labels", kind="label", label_key="label",
                                    weight=0.2)
    s.texts = shapes.source_config("shapes/captions", kind="caption", text_key="captions",
                                   weight=0.2)
    c.model = model_config((64, 2, 128, 4), (64, 2, 128, 4), (64, 1, 128, 4), embed_dim=64,
                           patch_size=16)
    c.flava = flava_config(mim_min_block=4, unimodal_steps=50)
    c.optimizer = shapes.optimizer_config(learning_rate=2e-3, warmup_steps=20,
                                          weight_decay=0.01)
    c.evals.batch_size = 250
    # The whole shapes validation split (500 images) for every evaluator, and all 4000
    # training images to fit the probe: ~62 per class (512 / 256 before: too few per class
    # for 64 classes, one test image was 0.4 points).
    c.evals.retrieval.num_examples = 500
    c.evals.zeroshot.num_examples = 500
    probe_train, probe_eval = 4000, 500
    c.evals.zeroshot.prefix = "caption"  # FLAVA ignores text_type; kept for the schema
  else:
    c.batch_size = 8192  # paper
    c.total_steps = 150_000  # our choice (not taken from the paper)
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    c.eval_every_steps = 10_000
    c.data_dir = "~/tensorflow_datasets"
    # 224 px, patch 16 (paper). 64 text tokens: our choice (sizes the position table).
    c.data = shapes.data_config(image_size=224, max_text_len=64)
    c.data.num_workers = 8
    c.data.tokenizer.vocab_size = 30_522  # BERT-sized; set data.tokenizer.path for a real one
    c.data.augment.random_resized_crop = True
    c.data.augment.min_crop_area = 0.5
    s = c.data.sources
    del s["labels"]
    s.captions = shapes.source_config("coco_captions", kind="caption",
                                      text_key="captions/text", weight=0.5)
    s.images = shapes.source_config("imagenet2012", kind="label", label_key="label",
                                    weight=0.25)
    s.texts = shapes.source_config("coco_captions", kind="caption", text_key="captions/text",
                                   weight=0.25)
    c.model = model_config((768, 12, 3072, 12), (768, 12, 3072, 12), (768, 6, 3072, 12),
                           embed_dim=768, patch_size=16)
    c.model.dtype = "bfloat16"
    c.flava = flava_config(mim_min_block=16, unimodal_steps=0)
    c.loss.label_aware = False  # paper: CLIP-style targets
    c.optimizer = shapes.optimizer_config(learning_rate=1e-3, warmup_steps=10_000,
                                          weight_decay=0.1)  # our choice, not verified
    c.evals.retrieval.update(dataset="coco_captions", split="test", text_key="captions/text",
                             num_examples=5000)
    c.evals.zeroshot.update(dataset="imagenet2012", split="validation", num_examples=50_000)
    # Off during pretraining, as configs/coca.py's (the fit runs on the host); on a
    # checkpoint: mmjax.evaluate ... --config.evals.linear_probe.num_examples=10000
    probe_train, probe_eval = 50_000, 0
  for key, modality in (("labels", "paired"), ("captions", "paired"), ("images", "image"),
                        ("texts", "text")):
    if key in s:
      s[key].modality = modality
  c.model.image_size = c.data.get_ref("image_size")
  c.model.text.vocab_size = c.data.tokenizer.get_ref("vocab_size")
  c.evals.linear_probe = shapes.linear_probe_config(c.evals.zeroshot, probe_train, probe_eval)
  c.lock()
  return c
