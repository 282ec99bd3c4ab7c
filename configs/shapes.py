"""Tiny CoCa on the embedded `shapes` dataset: the main job, a result in minutes anywhere.

  python -m mmjax.train --config configs/shapes.py --workdir /tmp/mmjax_shapes

The default is the first run: 250 steps at batch 64 and one evaluation at the end (no
linear probe), meant to take under 5 minutes on a 2-core CPU from a fresh data_dir (data
build and compile included). Append ",long" for the README's full table and the ablation:
800 steps, evaluated every 200, the probe at the end (configs/shapes.py:clip,long).

Presets (same data, steps and seed; only the objective changes):
  configs/shapes.py:clip               contrastive only, every pair its own class (CLIP)
  configs/shapes.py:unicl              contrastive with label-aware targets (UniCL)
  configs/shapes.py:unicl_prefix       UniCL + a learned prefix per text type
  configs/shapes.py:coca_unicl_prefix  the above + captioning loss (CoCa); the default
  configs/shapes.py:siglip             sigmoid contrastive with label-aware pairs (SigLIP)
Append ",tiny" (e.g. configs/shapes.py:clip,tiny) for a seconds-long smoke-test model.

Label data is shapes/labels_seen: 16 of the 64 colour-shape classes are held out of every
training label (mmjax/data/shapes.py). `evals.zeroshot` classifies the held-out classes'
images by prompts among those 16 (zero-shot transfer: metrics zeroshot/shapes_labels_unseen/*);
`evals.seen_classes` the seen classes' validation images among the 48 (closed-set accuracy
on training classes, not zero-shot: seen_classes/shapes_labels_seen/*). Both use the caption
prefix by default (`evals.<key>.prefix`, the prefix-conditioning paper's choice).
Any key can be overridden: --config.total_steps=100 --config.model.dtype=bfloat16
"""
import ml_collections

from configs import schema

PRESETS = ("clip", "unicl", "unicl_prefix", "coca_unicl_prefix", "siglip")
MODIFIERS = ("long", "tiny")
SHORT_STEPS = 250


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, *modifiers = (arg or "coca_unicl_prefix").split(",")
  if preset not in PRESETS or set(modifiers) - set(MODIFIERS) or len(modifiers) > 1:
    raise ValueError(f"configs/shapes.py:{arg}: choose one of {PRESETS}, optionally "
                     "followed by ',long' or ',tiny'")
  c = schema.base(model="coca", objective="siglip" if preset == "siglip" else "coca")
  c.name = f"shapes:{arg or preset}"
  c.evals.seen_classes = schema.zeroshot_eval("shapes/labels_seen")  # 500 images, 48 classes
  c.evals.zeroshot = schema.zeroshot_eval("shapes/labels_unseen",
                                          num_examples=1000)  # 16 held-out classes
  c.evals.retrieval = schema.retrieval_eval("shapes/captions")
  c.evals.captioning = schema.captioning_eval("shapes/captions")
  # As many tokens as training targets hold (text minus BOS), tracking data.max_text_len.
  c.evals.captioning.max_new_tokens = c.data.get_ref("max_text_len") - 1
  c.evals.linear_probe = schema.linear_probe_eval("shapes/labels", num_train=4000,
                                                  num_examples=512)
  # The probe's float64 L-BFGS fits on the host take minutes: the trained model's only.
  c.evals.linear_probe.every_steps = schema.FINAL_ONLY
  if preset == "clip":
    c.loss.label_aware = False
    c.loss.caption_weight = 0.0
    c.model.prefix_length = 0
  elif preset == "unicl":
    c.loss.caption_weight = 0.0
    c.model.prefix_length = 0
  elif preset == "unicl_prefix":
    c.loss.caption_weight = 0.0
  elif preset == "siglip":  # `unicl` with the sigmoid loss (its section: no captioning)
    c.model.prefix_length = 0
    use_sigmoid_logits(c.model)
  if "tiny" in modifiers:
    shrink_to_tiny(c)
  elif "long" not in modifiers:
    first_run(c)
  c.lock()
  return c


def use_sigmoid_logits(m: ml_collections.ConfigDict) -> None:
  """SigLIP's logits t * cos + b (arXiv 2303.15343): t = exp(t') from t' = log 10 and a
  learned bias b from -10, so that the many negatives start near their target. These are
  the paper's values for its batches of thousands; at batch 64 the prior log-odds of a pair
  being positive is log(1/63) = -4.1, so b starts further below it than in the paper.

  t is not capped (model.logit_scale_max = inf): the paper's t' is unconstrained and
  big_vision's SigLIP trainer applies no cap; its released SO400M/14@384 model ends at
  t = exp(4.7215) = 112 (open_clip issue #746), so CLIP's cap of 100 would bind and, through
  jnp.minimum, hold t there with a zero gradient.
  """
  m.logit_bias = True
  m.logit_scale_init = 10.0
  m.logit_bias_init = -10.0
  m.logit_scale_max = float("inf")


def first_run(c: ml_collections.ConfigDict) -> None:
  """A result in under 5 minutes on the 2-core development CPU, data build and compile
  included (benchmarks/readme_figures.py): 250 steps instead of 800 and one
  evaluation, at the last step, without the linear probe: its float64 fits on the host took
  more CPU time than the other evaluators together (over 55 CPU-seconds on 2000 images,
  against 8 for captioning). ",long" keeps the 800-step schedule and the probe. (Not a
  reference to total_steps: overriding eval_every_steps would then change total_steps.)"""
  c.total_steps = SHORT_STEPS
  c.eval_every_steps = SHORT_STEPS
  c.optimizer.warmup_steps = 25
  c.evals.linear_probe.num_examples = 0


def shrink_to_tiny(c: ml_collections.ConfigDict) -> None:
  """Seconds per run on a CPU: for smoke tests and CI; the code paths stay the same."""
  schema.smoke_test_run(c)
  c.data.image_size = 32
  c.data.max_text_len = 12
  c.data.tokenizer.vocab_size = 64
  c.model.patch_size = 8
  c.model.vision.update(width=32, depth=2, mlp_dim=64, num_heads=2)
  c.model.text.update(width=32, num_uni_layers=2, num_multi_layers=2, mlp_dim=64, num_heads=2)
  c.model.embed_dim = 16
  c.model.num_caption_queries = 4
  c.optimizer.warmup_steps = 2
  c.evals.retrieval.num_examples = 64
  c.evals.zeroshot.num_examples = 64
  c.evals.seen_classes.num_examples = 64
  c.evals.captioning.num_examples = 16  # one decode batch: one extra compile in the trainer
  c.evals.captioning.num_samples = 4
  c.evals.linear_probe.update(num_train=128, num_examples=64)
