"""Every mmjax config key, with its default and meaning, in one place.

Each config file (`configs/shapes.py`, `coca.py`, `flava.py`, `openclip.py`) starts from
`base(model=..., objective=...)` and changes values only; sections that apply to one model
or one objective exist only in configs that use it. Locked configs refuse any other key, so a
misspelled override fails with ml_collections' "did you mean" suggestion, and library code
reads every key directly (no `.get` defaults).

Sections:
  (top level)  run length, logging and checkpoint cadence, seeds, paths
  data         image size, text length, tokenizer, augmentation, the mixture of sources
  model        `model.name` picks the architecture (mmjax.models registry): coca | flava |
               two_tower
  loss         `loss.name` picks the objective (mmjax.objectives registry): coca | siglip |
               flava; each objective has its own keys
  optimizer    AdamW or the CoCa paper's Adafactor, learning-rate schedule
  mesh         device mesh shape and the logical-axis -> mesh-axis rules
  checkpoint   retention
  writers      optional experiment trackers beside metrics.jsonl and TensorBoard (W&B)
  profile      a jax.profiler trace of a window of train steps
  init         warm start from another model's checkpoint (parameters by path)
  watchdog     hang and straggler detection (timeouts, straggler factor)
  evals        evaluators by name; each entry's `type` picks the evaluator (mmjax.evaluators
               registry), so a config can run several of one type

Registered sections. The `model`, `loss` and `evals.<key>` sections belong to entries of
mmjax's registries (models.MODELS, objectives.OBJECTIVES, evaluators.EVALUATORS): entry NAME
has its section here as `NAME_model()`, `NAME_loss()` or `NAME_eval()` (`sections`), and
each entry points at it (`section`) next to its own `check(config)`, which validates
exactly these keys (`mmjax.cli.validate` runs every entry's). The sections are written
here, not in the entries' modules, for two reasons: this file stays the one place a user
reads every key with its default and meaning, and configs import nothing from mmjax
(configs -> mmjax, never back: tests/test_architecture.py), so a config file builds
without importing JAX. tests/test_configs.py checks that the registries' names and these
sections are the same sets. Adding an objective or an evaluator: its module (with
`check`), one registry line, and its section here.
"""
from typing import Callable

import ml_collections

ConfigDict = ml_collections.ConfigDict

REGISTRIES = ("model", "loss", "eval")  # section-function suffixes, see `sections`


def sections(registry: str) -> dict[str, Callable[..., ConfigDict]]:
  """Entry name -> its section function, for `registry` "model" (`coca_model`: the
  `model` section of model.name="coca"), "loss" (`siglip_loss`) or "eval"
  (`zeroshot_eval`: an `evals.<key>` entry of type "zeroshot")."""
  assert registry in REGISTRIES, registry
  suffix = f"_{registry}"
  return {name[:-len(suffix)]: fn for name, fn in globals().items()
          if name.endswith(suffix) and not name.startswith("_") and callable(fn)}


def base(*, model: str = "coca", objective: str = "coca") -> ConfigDict:
  """A complete config with every key at its default (an unlocked ConfigDict)."""
  c = ConfigDict()
  c.name = ""  # what this config is, e.g. "shapes:coca_unicl_prefix" (logs and summaries)
  c.seed = 0  # parameters, data order, augmentation and masking are functions of it
  c.batch_size = 64  # global, over all processes
  c.total_steps = 800
  c.grad_accum_steps = 1  # micro-batches per step (exact for the contrastive loss)
  c.log_every_steps = 25
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 200  # 0 = no evaluation during training
  c.eval_batch_size = 128  # images / texts embedded per evaluation batch
  # Evaluators see the parameters' EMA (needs optimizer.ema_decay > 0), in training and in
  # mmjax.evaluate (its --ema does the same for one run). A top-level key: `evals` holds
  # evaluator entries only.
  c.eval_use_ema = False
  c.data_dir = "~/.cache/mmjax/datasets"  # TFDS data_dir (sources may override it)
  c.compilation_cache_dir = "~/.cache/mmjax/jax_compilation_cache"  # "" = off
  # MFU denominator, dense bf16 TFLOP/s per device; 0 = look up the device kind (H100/H200,
  # A100, TPU v4/v5e/v5p/v6e), no MFU metric on unknown devices such as CPUs.
  c.peak_tflops_per_device = 0.0
  c.nonfinite_policy = "skip"  # a non-finite loss or gradient: skip the update | stop
  c.data = data()
  c.model = sections("model")[model]()
  c.loss = sections("loss")[objective]()
  c.optimizer = optimizer()
  c.mesh = mesh()
  c.checkpoint = checkpoint()
  c.writers = writers()
  c.profile = profile()
  c.watchdog = watchdog()
  c.evals = ConfigDict()
  c.init = init()
  c.model.image_size = c.data.get_ref("image_size")
  c.model.text.vocab_size = c.data.tokenizer.get_ref("vocab_size")
  return c


# --- run profiles shared by config files (values only; each file sets its run length) ---
def smoke_test_run(c: ConfigDict) -> None:
  """Seconds on a CPU: 10 steps of 16 examples, logs and checkpoints every 5 steps, one
  evaluation at the end in batches of 32."""
  c.update(batch_size=16, total_steps=10, log_every_steps=5, checkpoint_every_steps=5,
           eval_every_steps=10, eval_batch_size=32)


def pod_scale_run(c: ConfigDict) -> None:
  """A paper-scale pretraining run on real photos: logs every 100 steps, checkpoints every
  5,000, evaluates every 10,000; TFDS datasets in ~/tensorflow_datasets, 8 Grain workers,
  random resized crops of at least half the image (real photos: the shapes caveats on
  cropping do not apply)."""
  c.update(log_every_steps=100, checkpoint_every_steps=5000, eval_every_steps=10_000,
           data_dir="~/tensorflow_datasets")
  c.data.num_workers = 8
  c.data.augment.update(random_resized_crop=True, min_crop_area=0.5)


# --- data -------------------------------------------------------------------------------
def data(image_size: int = 64, max_text_len: int = 24) -> ConfigDict:
  d = ConfigDict()
  d.image_size = image_size
  d.max_text_len = max_text_len  # tokens incl. BOS and EOS; longer texts are truncated, EOS kept
  d.num_workers = 0  # Grain multiprocessing workers per process (0 = in-process)
  d.prefetch_batches = 2  # batches kept in flight on the device
  # Bad records (undecodable image, blank caption) are replaced and counted; a source stops
  # the run only when its bad fraction is above max_skip_fraction with skip_guard_confidence
  # (mmjax/data/accounting.py). Web corpora normally have 1-5% bad records.
  d.max_skip_fraction = 0.1
  d.skip_guard_confidence = 0.9999
  d.tokenizer = ConfigDict()
  # sentencepiece | openclip (open_clip's CLIP BPE) | siglip (a SigLIP checkpoint's
  # SentencePiece: EOS-padded, no BOS; `path` = its spiece.model)
  d.tokenizer.kind = "sentencepiece"
  # sentencepiece: a .model with mmjax's ids; "" trains one on the dataset texts, cached in
  # data_dir. openclip: the BPE merges file; "" reads the installed open_clip package's.
  d.tokenizer.path = ""
  d.tokenizer.vocab_size = 128  # ids the model embeds; sentencepiece trains this many
  d.label_templates = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
  # Replaces label_templates: "openai_imagenet_80" (CLIP's 80), "simple" (CLIP's 7) or a file
  # with one template per line ("" = label_templates). See mmjax/data/classnames.py.
  d.label_template_set = ""
  d.allow_wordnet_ids = False  # True: allow prompts from class names like "n01440764"
  d.augment = ConfigDict()
  d.augment.random_resized_crop = False  # off for shapes: a crop can cut a shape out of its caption
  d.augment.min_crop_area = 0.6
  d.augment.flip = False  # off for shapes: captions say "left of" / "right of"
  d.sources = ConfigDict()
  # The 48 seen shapes classes: the 16 of shapes/labels_unseen are never a training label
  # (zero-shot transfer, mmjax/data/shapes.py); captions show and name all 64.
  d.sources.labels = source("shapes/labels_seen", kind="label", label_key="label", weight=0.5)
  d.sources.captions = source("shapes/captions", kind="caption", text_key="captions",
                              weight=0.5)
  return d


def source(name: str, *, kind: str, weight: float, split: str = "train",
           image_key: str = "image", label_key: str = "", text_key: str = "",
           data_dir: str = "", modality: str = "paired", class_names: str = "") -> ConfigDict:
  """One TFDS dataset of the training mixture (`data.sources.<key>`).

  kind="label": texts are `data.label_templates` filled with the ClassLabel `label_key`'s
  class names; kind="caption": texts from `text_key` (a Text or Sequence(Text) feature; a
  nested feature as "captions/text"). `modality` (FLAVA's unimodal data) keeps the image and
  the text ("paired"), only the image ("image") or only the text ("text").

  class_names (kind="label"): "" = automatic (ImageNet WordNet ids -> CLIP's names, other
  datasets their own), "dataset", a built-in set ("imagenet1k") or a file with one name per
  line in label order (mmjax/data/classnames.py)."""
  s = ConfigDict()
  s.name = name  # TFDS name, e.g. "imagenet2012" or "shapes/labels_seen"
  s.split = split  # TFDS split, slicing allowed ("train[:90%]")
  s.kind = kind
  s.weight = weight  # mixing weight (> 0); weights are normalised
  s.image_key = image_key
  s.label_key = label_key
  s.text_key = text_key
  s.data_dir = data_dir  # "" = the top-level data_dir
  s.modality = modality
  s.class_names = class_names
  return s


# --- models -----------------------------------------------------------------------------
def _common_model(name: str) -> ConfigDict:
  """Keys every model reads (mmjax.models.config.ModelConfig); activation, dtype,
  param_dtype, scan_layers, remat_policy, attention_impl and norm_eps are the one `Stack`
  bundle every transformer layer takes."""
  m = ConfigDict()
  m.name = name
  m.image_size = 64  # tied to data.image_size by `base`
  m.patch_size = 16
  m.embed_dim = 128  # the shared image-text embedding
  m.logit_scale_init = 1 / 0.07  # contrastive temperature^-1 at init (CLIP, CoCa, FLAVA)
  m.logit_scale_max = 100.0  # the learned scale never exceeds this
  # gelu (exact) | quick_gelu (OpenAI CLIP / some open_clip models) | gelu_tanh (SigLIP)
  m.activation = "gelu"
  m.dtype = "float32"  # activations and matmuls; "bfloat16" for mixed precision
  m.param_dtype = "float32"
  m.scan_layers = True  # one compiled layer per stack: compile time flat in depth
  # What each layer keeps for the backward pass: "none" (everything), or a policy in
  # mmjax.models.layers.REMAT_POLICIES (full, dots, dots_with_no_batch_dims, save_qkv_proj,
  # save_attention_recompute_mlp, offload_*; the guide's memory knobs compare them).
  m.remat_policy = "none"
  # jax.nn.dot_product_attention's implementation: "xla" (any backend) or "cudnn" (cuDNN
  # fused flash attention: NVIDIA GPUs, bfloat16 compute; mmjax.models.layers).
  m.attention_impl = "xla"
  m.norm_eps = 1e-6  # every LayerNorm; open_clip (torch): 1e-5
  return m


def coca_model() -> ConfigDict:
  """CoCa (mmjax.models.coca): ViT, attentional poolers, unimodal + multimodal decoders.
  The options marked open_clip express open_clip's CoCa exactly (configs/openclip.py)."""
  m = _common_model("coca")
  m.vision = ConfigDict(dict(
      width=128, depth=4, mlp_dim=512, num_heads=4,
      patch_bias=True,  # open_clip: False
      class_token=False,  # prepended class token (open_clip: True)
      ln_pre=False,  # LayerNorm before the blocks (open_clip: True)
      ln_post=True))  # LayerNorm after the blocks (open_clip CoCa: False)
  m.text = ConfigDict(dict(
      width=128, num_uni_layers=2, num_multi_layers=2, mlp_dim=512, num_heads=4,
      vocab_size=128,  # tied to data.tokenizer.vocab_size by `base`
      cls_mask="correct",  # correct | legacy (open_clip's shipped CoCa weights)
      multimodal_block="fused"))  # fused (self, cross, MLP) | openclip (self+MLP, cross+MLP)
  m.pooler = "cascade"  # cascade (paper) | parallel | openclip (one pooler, query 0 contrastive)
  m.pooler_heads = 0  # attention heads of the poolers; 0 = text.num_heads
  m.num_caption_queries = 16  # paper: 256
  m.tie_embeddings = False  # paper counts an untied output projection
  m.prefix_length = 1  # learned prefix tokens per text type (prefix conditioning); 0 = off
  m.num_text_types = 2  # 0 = caption, 1 = label prompt (mmjax.vocabulary.TEXT_TYPES)
  m.image_norm = "none"  # none | clip (pixels -> CLIP mean/std, for open_clip weights)
  m.logit_bias = False  # a learned logit bias (sigmoid losses: SigLIP)
  m.logit_bias_init = -10.0  # its value at init (SigLIP paper)
  # Patch dropout (FLIP): the fraction of image patch tokens dropped at train time, a fresh
  # random subset per example from the step's key (resume stays exact); none at evaluation.
  # 0 = off; FLIP trains with 0.5 (or 0.75), then briefly without.
  # CoCa: the image encoder is shared, so the captioning decoder also attends to the kept
  # tokens only (running the encoder again on every token would give the saving back).
  m.patch_dropout = 0.0
  return m


def flava_model() -> ConfigDict:
  """FLAVA (mmjax.models.flava): image, text and multimodal encoders plus the heads."""
  m = _common_model("flava")
  m.vision = ConfigDict(dict(width=64, depth=2, mlp_dim=128, num_heads=4))
  m.text = ConfigDict(dict(width=64, num_layers=2, mlp_dim=128, num_heads=4,
                           vocab_size=128))  # tied to data.tokenizer.vocab_size by `base`
  m.multimodal = ConfigDict(dict(width=64, num_layers=1, mlp_dim=128, num_heads=4))
  m.embed_dim = 64
  return m


def two_tower_model() -> ConfigDict:
  """Two-tower contrastive model (mmjax.models.two_tower): CLIP / SigLIP. configs/pretrained.py
  sets these keys to express OpenAI CLIP, open_clip and SigLIP checkpoints exactly."""
  m = _common_model("two_tower")
  m.vision = ConfigDict(dict(
      width=128, depth=4, mlp_dim=512, num_heads=4,
      patch_bias=False,  # CLIP: False; SigLIP: True
      class_token=True,  # prepended class token (CLIP: True; SigLIP: False)
      ln_pre=True,  # LayerNorm before the blocks (CLIP: True; SigLIP: False)
      pool="cls",  # cls (CLIP) | mean (patch tokens) | map (attention probe, SigLIP)
      proj=True))  # linear projection to embed_dim (SigLIP: False, embed_dim = width)
  m.text = ConfigDict(dict(
      width=128, num_layers=4, mlp_dim=512, num_heads=4,
      vocab_size=128,  # tied to data.tokenizer.vocab_size by `base`
      causal=True,  # causal self-attention (CLIP) | bidirectional (SigLIP)
      pool="eot",  # eot (the end-of-text token, CLIP) | last (SigLIP) | first
      proj_bias=False))  # bias of the text projection (SigLIP's text head: True)
  m.image_norm = "none"  # none | clip (pixels -> CLIP mean/std, for CLIP weights)
  m.logit_bias = False  # a learned logit bias (sigmoid losses: SigLIP)
  m.logit_bias_init = -10.0  # its value at init (SigLIP paper)
  # Patch dropout (FLIP): the fraction of image patch tokens dropped at train time, a fresh
  # random subset per example from the step's key (resume stays exact); none at evaluation.
  # 0 = off; FLIP trains with 0.5 (or 0.75), then briefly without.
  m.patch_dropout = 0.0
  return m


# --- objectives (`loss`) -----------------------------------------------------------------
def coca_loss() -> ConfigDict:
  """CoCa = contrastive + captioning (mmjax.objectives.coca). label_aware=True gives UniCL's
  targets (same class = positive); caption_weight=0 gives CLIP / UniCL alone."""
  l = ConfigDict()
  l.name = "coca"
  l.contrastive_weight = 1.0
  l.caption_weight = 2.0  # CoCa: 2 x captioning
  l.label_aware = True  # UniCL targets from labels; False = CLIP (every pair its own class)
  l.caption_loss_on_labels = True  # CoCa applies captioning to label prompts too
  l.sharded = True  # memory-linear ring over the batch axes of the mesh (False: dense B x B)
  # Token positions per chunk of the captioning head fused with its cross-entropy
  # (losses.fused_caption_loss): at most [micro-batch, chunk, vocab] logits exist.
  # 0 = plain logits.
  l.caption_chunk_size = 0
  return l


def flava_loss() -> ConfigDict:
  """FLAVA's six losses and their schedule (mmjax.objectives.flava)."""
  f = ConfigDict()
  f.name = "flava"
  f.mlm_rate = 0.15  # BERT; selected tokens -> 80% [MASK], 10% random, 10% kept
  f.mim_ratio = 0.4  # BEiT: 75 of 196 patches
  f.mim_min_block = 16  # BEiT: 16 patches
  # MIM targets. DEVIATION from the paper, whose targets are DALL-E dVAE tokens (8192 codes
  # at 112 px; no download here): pixels (MAE normalised pixels, no pretrained network) |
  # codebook (nearest of the centroids in codebook_path, e.g. k-means of training patches).
  f.mim_target = "pixels"
  f.codebook_path = ""  # .npz with centroids [K, patch**2 * 3] (mim_target="codebook")
  f.codebook_size = 8192  # K; must match the file (8192 = the dVAE's vocabulary)
  f.mlm_on_paired = False  # paper, torchmultimodal: MLM on text-only data; paired captions
  # get MMM. True: MLM on the paired captions too (an option, not the paper's recipe)
  f.mim_on_paired = False  # paper: MIM on image-only data; paired images get MMM
  f.itm_negative_rate = 0.1
  # Unimodal phase (the paper pretrains the unimodal encoders first): before this step only
  # MLM and MIM, on batches drawn from the unimodal sources (modality image / text) only;
  # from it on, all six objectives on the whole mixture. 0 = joint from the start.
  f.unimodal_steps = 0
  f.label_aware = True  # contrastive targets from labels (UniCL); False = CLIP
  f.weights = ConfigDict(dict(mlm=1.0, mim=1.0, mmm_text=1.0, mmm_image=1.0, itm=1.0,
                              contrastive=1.0))  # paper: all 1.0
  return f


def siglip_loss() -> ConfigDict:
  """SigLIP = sigmoid contrastive (mmjax.objectives.siglip, arXiv 2303.15343): every
  image-text pair a binary classification with logits t * cos + b, t and b learned (needs
  model.logit_bias=True). CoCa's keys with CoCa's meaning: label_aware=True makes pairs of
  one class positives (UniCL's targets), False only the own pair (the paper's loss);
  caption_weight > 0 adds CoCa's captioning term; sharded = the memory-linear ring."""
  l = coca_loss()
  l.name = "siglip"
  l.caption_weight = 0.0  # the paper: contrastive alone
  return l


# --- optimisation, mesh, checkpoints, profiling ---------------------------------------------
def optimizer(learning_rate: float = 2e-3, warmup_steps: int = 50,
              weight_decay: float = 0.01) -> ConfigDict:
  o = ConfigDict()
  o.name = "adamw"  # adamw | adafactor (the CoCa paper's)
  o.learning_rate = learning_rate  # peak
  o.warmup_steps = warmup_steps  # linear from 0
  o.schedule = "cosine"  # cosine | linear decay after the warmup, to the end fraction
  o.end_learning_rate_fraction = 0.0
  o.b1 = 0.9
  o.b2 = 0.999
  o.weight_decay = weight_decay  # decoupled: each update subtracts weight_decay * lr * p;
  # never on biases, norms, position embeddings, learned queries/prefix/CLS, logit scale
  o.grad_clip_norm = 1.0  # global gradient norm; 0 = off
  # adafactor only (mmjax.optimizer.adafactor): per-parameter update RMS clipping (0 = off)
  # and the smallest two axes its second moments are factored over.
  o.update_clip_threshold = 1.0
  o.min_dim_size_to_factor = 128
  # Fine-tuning (mmjax.param_groups; paths as `python -m mmjax.summary` lists them).
  # Locked parameters: a regex over parameter paths matched whole ("vision/.*" = the image
  # tower; "" = none). No optimizer state, update or weight decay; no gradient computed.
  o.frozen = ""
  o.frozen_until_step = 0  # > 0: locked only for the first N updates, then trained
  # Layer-wise learning-rate decay of the image and text stacks: layer i of L at
  # decay^(L - i) x the rate, embeddings decay^(L + 1), heads 1. 1.0 = off.
  o.layer_decay = 1.0
  # An exponential moving average of the parameters (state.ema_params, checkpointed):
  # ema <- d ema + (1 - d) params after each update; 0 = off. With ema_warmup, d at update t
  # is min(ema_decay, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage).
  o.ema_decay = 0.0
  o.ema_warmup = False
  return o


def init() -> ConfigDict:
  """Warm start of a fresh run from another model's checkpoint (mmjax.warm_start); ignored
  when the workdir has a checkpoint to resume."""
  i = ConfigDict()
  i.checkpoint = ""  # a work directory with checkpoints/ (mmjax.train / mmjax.convert); ""= off
  # "TARGET=SOURCE" entries: this model's parameter paths matching the regex TARGET load from
  # the source path SOURCE (\1 = TARGET's group); empty SOURCE = freshly initialised; no
  # match = the same path if the checkpoint has it.
  i.rules = ()
  return i


def mesh() -> ConfigDict:
  m = ConfigDict()
  m.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  # Multislice TPU jobs: slices spanned by each axis (product = number of slices; -1 takes
  # the rest): the data axis crosses the data-centre network, the others stay in a slice.
  m.dcn_shape = (-1, 1, 1)
  # Logical axis (named in model code) -> mesh axes. "batch" also shards every input batch.
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


def checkpoint() -> ConfigDict:
  """Retention of the persistent checkpoints (`<workdir>/checkpoints`, every
  `checkpoint_every_steps`), and the local tier (mmjax.local_checkpoint)."""
  k = ConfigDict()
  k.max_to_keep = 3
  k.keep_period = 0  # also keep every K-th step's checkpoint; 0 = off
  # Local tier: every `local_every_steps` each process saves its own shards to `local_dir`
  # (fast storage of its host, e.g. /dev/shm/mmjax or a local SSD; '' = off), copied to the
  # next process; a restart takes the newest whole step of either tier.
  k.local_dir = ""
  k.local_every_steps = 0
  return k


def watchdog() -> ConfigDict:
  """Hang and straggler detection, per process (mmjax.watchdog; exit status 43 on a hang)."""
  w = ConfigDict()
  w.timeout_s = 600.0  # no training step completes for this long: a hang; 0 = off
  w.long_timeout_s = 1800.0  # the same for the first step, an evaluation, a checkpoint save
  w.straggler_factor = 5.0  # a step this many times the median step time is logged
  return w


def writers() -> ConfigDict:
  """Where metrics go besides `<workdir>/metrics.jsonl` and TensorBoard (always written)."""
  w = ConfigDict()
  # Weights & Biases (`pip install -e '.[wandb]'`): metrics, the config and the sample
  # pictures, from the lead process only. One W&B run per work directory (its id is derived
  # from the path), so a resumed run continues the same W&B run.
  w.wandb = False
  w.wandb_project = "mmjax"
  w.wandb_entity = ""  # "" = your default entity
  w.wandb_name = ""  # "" = the work directory's name
  w.wandb_mode = ""  # "" = W&B's own choice (online unless WANDB_MODE); offline | disabled
  return w


def profile() -> ConfigDict:
  """A jax.profiler trace of train steps start_step .. start_step + num_steps - 1 under
  <workdir>/profile (mmjax.profiling; TensorBoard's Profile tab opens it)."""
  p = ConfigDict()
  p.start_step = 10  # past the first step's compilation
  p.num_steps = 0  # 0 = off
  return p


# --- evaluators (`evals.<name>`) ----------------------------------------------------------
# `every_steps` of an evaluator: when the trainer runs it. EVERY_EVAL (0) = at every
# `eval_every_steps`; FINAL_ONLY (-1) = only at the last step; N > 0 = every N steps. The
# trainer always evaluates at the last step; `mmjax.evaluate` runs every evaluator.
EVERY_EVAL, FINAL_ONLY = 0, -1
def zeroshot_eval(dataset: str = "shapes/labels_unseen", split: str = "validation",
                  num_examples: int = 512) -> ConfigDict:
  """Classification by class-name prompts (data.label_templates, averaged) among the
  dataset's classes. Zero-shot only when none of those classes is a training label (e.g.
  shapes/labels_unseen); on training classes it is closed-set accuracy (configs/shapes.py
  names that entry `evals.seen_classes`)."""
  return ConfigDict(dict(
      type="zeroshot", dataset=dataset, split=split, image_key="image", label_key="label",
      num_examples=num_examples,  # 0 = off
      every_steps=EVERY_EVAL,
      prefix="caption",  # text-type prefix of the prompts: caption (paper) | label
      class_names="",  # as data.sources.*.class_names
      class_subset="",  # "" = every class; imagenet_a | imagenet_r: the 200 classes kept
      templates=""))  # "" = the training templates; else as data.label_template_set


def retrieval_eval(dataset: str = "shapes/captions", split: str = "validation",
                   num_examples: int = 512) -> ConfigDict:
  """Image -> text and text -> image recall@{1,5,10}."""
  return ConfigDict(dict(type="retrieval", dataset=dataset, split=split, image_key="image",
                         text_key="captions", num_examples=num_examples,
                         every_steps=EVERY_EVAL))


def captioning_eval(dataset: str = "shapes/captions", split: str = "validation",
                    num_examples: int = 512) -> ConfigDict:
  """Generated captions (K/V-cached decoding) scored with CIDEr and BLEU-4."""
  return ConfigDict(dict(
      type="captioning", dataset=dataset, split=split, image_key="image",
      text_key="captions", num_examples=num_examples, every_steps=EVERY_EVAL,
      strategy="greedy",  # greedy | beam | sample
      beam_size=4, length_penalty=1.0,  # beam: sum log p / length**length_penalty
      max_new_tokens=23,  # configs tie it to data.max_text_len - 1
      num_samples=16,  # images in <workdir>/eval/samples_<step>.png (0 = no grid)
      sample_scale=4))  # nearest-neighbour upscaling of each image in the grid


def linear_probe_eval(dataset: str = "shapes/labels", split: str = "validation",
                      num_train: int = 4000, num_examples: int = 512) -> ConfigDict:
  """A linear classifier on the frozen `image_features` (mmjax.evaluators.linear_probe):
  fitted on `num_train` images of `train_split`, lambda from `l2_grid` chosen on a
  `holdout_fraction` of them, scored on `num_examples` images of `split`."""
  return ConfigDict(dict(
      type="linear_probe", dataset=dataset, train_split="train", split=split,
      image_key="image", label_key="label", class_names="",  # as data.sources.*.class_names
      num_train=num_train, num_examples=num_examples, every_steps=EVERY_EVAL,
      classifier="logistic",  # logistic | ridge
      l2_grid=(1e-5, 1e-4, 1e-3, 1e-2), holdout_fraction=0.2))
