"""FLAVA (arXiv 2112.04482): tiny on the embedded `shapes` data, full at the paper's sizes.

  python -m mmjax.train --config configs/flava.py:tiny --workdir /tmp/mmjax_flava
  python -m mmjax.evaluate --config configs/flava.py:tiny --workdir /tmp/mmjax_flava

Variants:
  tiny  64 px, patch 16 (4 x 4 = 16 patches, as configs/shapes.py), encoders width 64 /
        2 layers, multimodal 1 layer, batch 64, 1800 steps (50 unimodal); shapes data with
        16 classes held out of the labels (mmjax/data/shapes.py): `evals.zeroshot` is
        zero-shot on them, `evals.seen_classes` closed-set on the 48 trained (RESULTS.md, FLAVA).
  full  the paper's sizes: ViT-B/16 at 224 px (768 wide, 12 layers, MLP 3072, 12 heads), a
        text encoder of the same shape, a 6-layer multimodal encoder of width 768; batch
        8192. Data: coco_captions pairs, imagenet2012 images (image-only), coco captions as
        text-only stand-in for CCNews/BookCorpus (mmjax sources are TFDS image datasets).

Data: every source is read as usual (`kind` label/caption) and viewed through its
`modality` ("paired" | "image" | "text"): an image-only view drops the text (all PAD), a
text-only view zeroes the image; batches then carry has_image / has_text / paired flags and
each loss is averaged over the examples it applies to (see mmjax/objectives/flava.py).

Objectives (config.loss, `loss.name="flava"`), each on the data the paper applies it to:
  MLM          15%, BERT 80/10/10, on text-only data (paper, torchmultimodal); paired
               captions get MMM instead. `loss.mlm_on_paired=True` adds the paired captions.
  MIM          BEiT block masking of 40% of the patches, on image-only data
               (`loss.mim_on_paired=True` adds the paired images). Targets DEVIATE from
               the paper (DALL-E dVAE tokens, which cannot be downloaded here):
               `loss.mim_target` "pixels" = MAE normalised pixels (default), or "codebook" =
               nearest centroid of `loss.codebook_path` (e.g. k-means of training patches,
               mmjax.objectives.flava.fit_patch_codebook).
  MMM          masked text + masked image through the multimodal encoder, matched pairs only
  ITM          swapped-caption negatives at `itm_negative_rate`
  contrastive  global, over the paired examples (UniCL targets; CLIP with label_aware=False)
Schedule: the paper pretrains the unimodal encoders first, on unimodal data (ImageNet-1K
images; CCNews + BookCorpus text), then trains all objectives jointly on all data. One run
does both here, with FLAVA's own unimodal losses: for steps < `loss.unimodal_steps`,
batches come from the image-only and text-only sources only and the loss is MLM + MIM (the
encoders share no parameters: two unimodal pretrainings side by side); from that step on,
all six objectives on the whole mixture. The paper's unimodal encoders come from separate
runs, with no length in the joint run's steps, so `full`'s unimodal_steps is our choice
(see `full`).
"""
import ml_collections

from configs import schema

VARIANTS = ("tiny", "full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/flava.py:{arg}: choose one of {VARIANTS}")
  c = schema.base(model="flava", objective="flava")
  c.name = f"flava:{variant}"
  if variant == "tiny":
    tiny(c)
  else:
    full(c)
  s = c.data.sources
  for key, modality in (("labels", "paired"), ("captions", "paired"), ("images", "image"),
                        ("texts", "text")):
    if key in s:
      s[key].modality = modality
  c.lock()
  return c


def tiny(c: ml_collections.ConfigDict) -> None:
  # Measured (RESULTS.md, FLAVA): at 32 px / patch 4 / width 32 / batch 32 the model barely learned
  # in 300-700 steps; 64 px / patch 16 (the CoCa shapes resolution), width 64 and batch
  # 64 (~38 paired examples per contrastive batch) learned faster, and the linear probe
  # needs the longer schedule (600 steps: no clear gain over random features).
  c.batch_size = 64
  c.total_steps = 1800
  c.log_every_steps = 50
  c.checkpoint_every_steps = 600
  c.eval_every_steps = 1800  # the final step only (the evaluation takes ~30 s here)
  c.eval_batch_size = 250
  c.data.image_size = 64
  c.data.max_text_len = 12
  c.data.tokenizer.vocab_size = 64
  s = c.data.sources
  # Paired views (labels + captions), and unimodal views of the same two datasets.
  s.labels.weight, s.captions.weight = 0.3, 0.3
  # Image-only view of the seen classes' images: no held-out class in training at all.
  s.images = schema.source("shapes/labels_seen", kind="label", label_key="label", weight=0.2)
  s.texts = schema.source("shapes/captions", kind="caption", text_key="captions",
                          weight=0.2)
  set_sizes(c.model, (64, 2, 128, 4), (64, 2, 128, 4), (64, 1, 128, 4), embed_dim=64,
            patch_size=16)
  c.loss.mim_min_block = 4
  c.loss.unimodal_steps = 50  # our choice: ~3% of the run (image-only + text-only batches)
  c.optimizer.warmup_steps = 20
  # Whole validation splits for every evaluator, and all 4000 training images of the 64
  # classes to fit the probe: ~62 per class (512 / 256 before: too few per class for 64
  # classes, one test image was 0.4 points). Zero-shot on the 16 held-out classes
  # (1000 images), closed-set on the 48 seen ones (500 images).
  c.evals.retrieval = schema.retrieval_eval("shapes/captions", num_examples=500)
  c.evals.seen_classes = schema.zeroshot_eval("shapes/labels_seen", num_examples=500)
  c.evals.zeroshot = schema.zeroshot_eval("shapes/labels_unseen", num_examples=1000)
  # FLAVA has no text-type prefix: the prefix keys are inert.
  c.evals.linear_probe = schema.linear_probe_eval("shapes/labels", num_train=4000,
                                                  num_examples=500)


def full(c: ml_collections.ConfigDict) -> None:
  schema.pod_scale_run(c)
  c.batch_size = 8192  # paper
  c.total_steps = 150_000  # our choice (not taken from the paper)
  # 224 px, patch 16 (paper). 64 text tokens: our choice (sizes the position table).
  d = c.data
  d.image_size = 224
  d.max_text_len = 64
  d.tokenizer.vocab_size = 30_522  # BERT-sized; set data.tokenizer.path for a real one
  s = d.sources
  del s["labels"]
  s.captions = schema.source("coco_captions", kind="caption", text_key="captions/text",
                             weight=0.5)
  s.images = schema.source("imagenet2012", kind="label", label_key="label", weight=0.25)
  s.texts = schema.source("coco_captions", kind="caption", text_key="captions/text",
                          weight=0.25)
  set_sizes(c.model, (768, 12, 3072, 12), (768, 12, 3072, 12), (768, 6, 3072, 12),
            embed_dim=768, patch_size=16)
  c.model.dtype = "bfloat16"
  # 512 examples per device on a v4-32 (FLAVA has no gradient accumulation): without remat
  # the step needs 276 GiB per chip; recomputing each layer it fits (benchmarks/RESULTS.md).
  c.model.remat_policy = "full"
  c.loss.mim_min_block = 16
  # The paper pretrains the unimodal encoders before joint training but in separate runs,
  # with no length in this run's steps: our choice is 10% of the run. The phase's batches
  # are the image-only and text-only sources (0.25 / 0.25 -> half each): 15k x 8192 / 2 =
  # 61M ImageNet images (~48 epochs of its 1.28M) and 61M texts.
  c.loss.unimodal_steps = 15_000
  c.loss.label_aware = False  # paper: CLIP-style targets
  c.optimizer.update(learning_rate=1e-3, warmup_steps=10_000,
                     weight_decay=0.1)  # our choice, not verified
  c.evals.retrieval = schema.retrieval_eval("coco_captions", split="test", num_examples=5000)
  c.evals.retrieval.text_key = "captions/text"
  # Zero-shot: imagenet2012 trains the image encoder as images only; its labels and class
  # names never reach training (FLAVA's paired data are coco_captions).
  c.evals.zeroshot = schema.zeroshot_eval("imagenet2012", num_examples=50_000)
  c.evals.zeroshot.templates = "openai_imagenet_80"  # CLIP's 80 (names: automatic)
  # Off during pretraining, as configs/coca.py's (the fit runs on the host); on a
  # checkpoint: mmjax.evaluate ... --config.evals.linear_probe.num_examples=10000
  c.evals.linear_probe = schema.linear_probe_eval("imagenet2012", num_train=50_000,
                                                  num_examples=0)


def set_sizes(m: ml_collections.ConfigDict, vision: tuple[int, int, int, int],
              text: tuple[int, int, int, int], multimodal: tuple[int, int, int, int],
              embed_dim: int, patch_size: int) -> None:
  """(width, layers, mlp_dim, heads) per encoder."""
  keys = ("width", "num_layers", "mlp_dim", "num_heads")
  m.vision.update(dict(zip(("width", "depth", "mlp_dim", "num_heads"), vision)))
  m.text.update(dict(zip(keys, text)))
  m.multimodal.update(dict(zip(keys, multimodal)))
  m.embed_dim = embed_dim
  m.patch_size = patch_size
