"""Tiny CoCa on the embedded `shapes` dataset: the main job, runs anywhere in minutes.

  python -m mmjax.train --config configs/shapes.py --workdir /tmp/mmjax_shapes

Presets (same data, steps and seed; only the objective changes):
  configs/shapes.py:clip               contrastive only, every pair its own class (CLIP)
  configs/shapes.py:unicl              contrastive with label-aware targets (UniCL)
  configs/shapes.py:unicl_prefix       UniCL + a learned prefix per text type
  configs/shapes.py:coca_unicl_prefix  the above + captioning loss (CoCa); the default
Append ",tiny" (e.g. configs/shapes.py:clip,tiny) for a seconds-long smoke-test model.
Any key can be overridden: --config.total_steps=100 --config.model.dtype=bfloat16
"""
import ml_collections

PRESETS = ("clip", "unicl", "unicl_prefix", "coca_unicl_prefix")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, *modifiers = (arg or "coca_unicl_prefix").split(",")
  if preset not in PRESETS or set(modifiers) - {"tiny"}:
    raise ValueError(f"configs/shapes.py:{arg}: choose one of {PRESETS}, optionally "
                     "followed by ',tiny'")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.batch_size = 64  # global, over all processes
  c.total_steps = 800
  c.grad_accum_steps = 1
  c.log_every_steps = 25
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 200
  c.data_dir = "~/.cache/mmjax/datasets"
  c.compilation_cache_dir = "~/.cache/mmjax/jax_compilation_cache"  # "" = off
  # MFU denominator, dense bf16 TFLOP/s per device; 0 = look up the device kind (H100/H200,
  # A100, TPU v4/v5e/v5p/v6e), no MFU metric on unknown devices such as CPUs.
  c.peak_tflops_per_device = 0.0

  c.data = data_config(image_size=64, max_text_len=24)
  c.model = model_config()
  c.model.image_size = c.data.get_ref("image_size")
  c.model.text.vocab_size = c.data.tokenizer.get_ref("vocab_size")
  c.loss = loss_config()
  c.optimizer = optimizer_config(learning_rate=2e-3, warmup_steps=50, weight_decay=0.01)
  c.mesh = mesh_config()
  c.checkpoint = checkpoint_config()
  c.profile = profile_config()
  c.evals = evals_config()
  # As many tokens as training targets hold (text minus BOS), tracking data.max_text_len.
  c.evals.captioning.max_new_tokens = c.data.get_ref("max_text_len") - 1
  c.evals.linear_probe = linear_probe_config(c.evals.zeroshot, num_train=4000,
                                            num_examples=512)

  if preset == "clip":
    c.loss.label_aware = False
    c.loss.caption_weight = 0.0
    c.model.prefix_length = 0
  elif preset == "unicl":
    c.loss.caption_weight = 0.0
    c.model.prefix_length = 0
  elif preset == "unicl_prefix":
    c.loss.caption_weight = 0.0
  if "tiny" in modifiers:
    shrink_to_tiny(c)
  c.lock()
  return c


def shrink_to_tiny(c: ml_collections.ConfigDict) -> None:
  """Seconds per run on a CPU: for smoke tests and CI; the code paths stay the same."""
  c.batch_size = 16
  c.total_steps = 10
  c.log_every_steps = 5
  c.checkpoint_every_steps = 5
  c.eval_every_steps = 10
  c.data.image_size = 32
  c.data.max_text_len = 12
  c.data.tokenizer.vocab_size = 64
  c.model.patch_size = 8
  c.model.vision.update(width=32, depth=2, mlp_dim=64, num_heads=2)
  c.model.text.update(width=32, num_uni_layers=2, num_multi_layers=2, mlp_dim=64, num_heads=2)
  c.model.embed_dim = 16
  c.model.num_caption_queries = 4
  c.optimizer.warmup_steps = 2
  c.evals.batch_size = 32
  c.evals.retrieval.num_examples = 64
  c.evals.zeroshot.num_examples = 64
  c.evals.captioning.num_examples = 16  # one decode batch: one extra compile in the trainer
  c.evals.captioning.num_samples = 4
  c.evals.linear_probe.update(num_train=128, num_examples=64)


def data_config(image_size: int, max_text_len: int) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.image_size = image_size
  d.max_text_len = max_text_len  # tokens incl. BOS and EOS; longer texts are truncated, EOS kept
  d.num_workers = 0  # Grain multiprocessing workers per process (0 = in-process)
  d.prefetch_batches = 2  # batches kept in flight on the device
  d.max_skip_fraction = 0.01  # undecodable images tolerated before the run stops
  d.tokenizer = ml_collections.ConfigDict()
  d.tokenizer.path = ""  # a SentencePiece .model; "" trains one on the dataset texts, cached in data_dir
  d.tokenizer.vocab_size = 128  # only used when training the tokenizer
  d.label_templates = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
  d.augment = ml_collections.ConfigDict()
  d.augment.random_resized_crop = False  # off for shapes: a crop can cut a shape out of its caption
  d.augment.min_crop_area = 0.6
  d.augment.flip = False  # off for shapes: captions say "left of" / "right of"
  d.sources = ml_collections.ConfigDict()
  d.sources.labels = source_config("shapes/labels", kind="label", label_key="label", weight=0.5)
  d.sources.captions = source_config("shapes/captions", kind="caption", text_key="captions",
                                     weight=0.5)
  return d


def source_config(name: str, *, kind: str, weight: float, split: str = "train",
                  image_key: str = "image", label_key: str = "", text_key: str = "",
                  data_dir: str = "") -> ml_collections.ConfigDict:
  """One TFDS dataset. kind="label": text from class-name templates; kind="caption": text_key."""
  s = ml_collections.ConfigDict()
  s.name = name
  s.split = split
  s.kind = kind
  s.weight = weight
  s.image_key = image_key
  s.label_key = label_key
  s.text_key = text_key
  s.data_dir = data_dir  # "" = the top-level data_dir
  return s


def model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.name = "coca"
  m.image_size = 64
  m.patch_size = 16  # 4 x 4 patches: on 2 CPU cores, steps matter more than resolution
  m.vision = ml_collections.ConfigDict(dict(width=128, depth=4, mlp_dim=512, num_heads=4))
  m.text = ml_collections.ConfigDict(dict(width=128, num_uni_layers=2, num_multi_layers=2,
                                          mlp_dim=512, num_heads=4, vocab_size=128))
  m.embed_dim = 128  # shared image-text embedding space
  m.pooler = "cascade"  # "cascade" (paper) or "parallel"
  m.num_caption_queries = 16  # paper: 256
  m.tie_embeddings = False  # paper counts an untied output projection
  m.prefix_length = 1  # learned prefix tokens per text type (prefix conditioning); 0 = off
  m.num_text_types = 2  # 0 = caption, 1 = label prompt
  m.logit_scale_init = 1 / 0.07
  m.logit_scale_max = 100.0
  m.dtype = "float32"  # activations and matmuls; "bfloat16" for mixed precision
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat_policy = "none"  # none, or a policy in mmjax.models.layers.REMAT_POLICIES
  return m


def loss_config() -> ml_collections.ConfigDict:
  l = ml_collections.ConfigDict()
  l.contrastive_weight = 1.0
  l.caption_weight = 2.0  # CoCa: 2 x captioning
  l.label_aware = True  # UniCL targets from labels; False = CLIP (every pair its own class)
  l.caption_loss_on_labels = True  # CoCa applies captioning to label prompts too
  # Token positions per chunk of the captioning head fused with its cross-entropy
  # (mmjax.fused_xent): at most [micro-batch, chunk, vocab] logits exist. 0 = plain logits.
  l.caption_chunk_size = 0
  l.sharded = True  # memory-linear shard_map loss over the batch axes of the mesh
  l.nonfinite_policy = "skip"  # skip | stop
  return l


def optimizer_config(learning_rate: float, warmup_steps: int,
                     weight_decay: float) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.name = "adamw"  # adamw | adafactor
  o.learning_rate = learning_rate
  o.warmup_steps = warmup_steps
  o.schedule = "cosine"  # cosine | linear
  o.end_learning_rate_fraction = 0.0
  o.b1 = 0.9
  o.b2 = 0.999
  o.weight_decay = weight_decay
  o.grad_clip_norm = 1.0
  return o


def mesh_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  m.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("length", None),
      ("layers", None),
  )
  return m


def checkpoint_config() -> ml_collections.ConfigDict:
  k = ml_collections.ConfigDict()
  k.max_to_keep = 3
  k.keep_period = 0  # also keep every K-th step's checkpoint; 0 = off
  return k


def profile_config() -> ml_collections.ConfigDict:
  """A jax.profiler trace of train steps start_step .. start_step + num_steps - 1 under
  <workdir>/profile (mmjax.profiling; TensorBoard's Profile tab opens it)."""
  p = ml_collections.ConfigDict()
  p.start_step = 10  # past the first step's compilation
  p.num_steps = 0  # 0 = off
  return p


def evals_config() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.batch_size = 128
  e.retrieval = ml_collections.ConfigDict(dict(
      dataset="shapes/captions", split="validation", image_key="image", text_key="captions",
      num_examples=512))
  e.zeroshot = ml_collections.ConfigDict(dict(
      dataset="shapes/labels", split="validation", image_key="image", label_key="label",
      num_examples=512, prefix="caption"))
  e.captioning = ml_collections.ConfigDict(dict(
      dataset="shapes/captions", split="validation", image_key="image", text_key="captions",
      num_examples=512,
      strategy="greedy",  # greedy | beam (| sample)
      beam_size=4, length_penalty=1.0,  # beam: sum log p / length**length_penalty
      max_new_tokens=23,  # get_config ties it to data.max_text_len - 1
      num_samples=16,  # images in <workdir>/eval/samples_<step>.png (0 = no grid)
      sample_scale=4))  # nearest-neighbour upscaling of each image in the grid
  return e


def linear_probe_config(zeroshot: ml_collections.ConfigDict, num_train: int,
                        num_examples: int) -> ml_collections.ConfigDict:
  """Linear probe (mmjax.linear_probe) on the model's frozen `image_features`: multinomial
  logistic regression fitted on `num_train` images of the zero-shot dataset's train split
  (lambda from l2_grid, chosen on a holdout_fraction of them), scored on `num_examples`
  images of its evaluation split (0 = off). Values are copied, not referenced: overriding a
  probe key must not move the zero-shot evaluator."""
  return ml_collections.ConfigDict(dict(
      dataset=zeroshot.dataset, train_split="train", split=zeroshot.split,
      image_key=zeroshot.image_key, label_key=zeroshot.label_key, num_train=num_train,
      num_examples=num_examples,
      classifier="logistic",  # logistic | ridge
      l2_grid=(1e-5, 1e-4, 1e-3, 1e-2), holdout_fraction=0.2))
