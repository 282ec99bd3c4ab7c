"""CoCa at the paper's scale (arXiv 2205.01917, Table 1), on real TFDS datasets.

  python -m mmjax.train --config configs/coca.py:base,v4_32 --workdir gs://BUCKET/coca_base
  python -m mmjax.summary --config configs/coca.py:giant [--json]   # params and FLOPs

Variants (model sizes from Table 1; all: 288 px images, patch 18 -> 256 image tokens,
64,000-token SentencePiece vocabulary, 256 captioning queries, cascade pooler, untied output
projection, bfloat16 compute with float32 parameters, scanned layers):

  variant  ViT layers/MLP/width/heads   decoder uni/multi/MLP/width/heads   paper params
  tiny     2 / 512 / 128 / 4            1 / 1 / 512 / 128 / 4               (CPU smoke test)
  base     12 / 3072 / 768 / 12         12 / 12 / 3072 / 768 / 12           86M + 297M = 383M
  large    24 / 4096 / 1024 / 16        12 / 12 / 4096 / 1024 / 16          303M + 484M = 787M
  giant    40 / 6144 / 1408 / 16        18 / 18 / 5632 / 1408 / 16          1B + 1.1B = 2.1B

Vocabulary: 64,000 rather than 65,536 because the paper's decoder counts need it: with two
untied 64,000 x width tables the built decoders have 296.8M (Base, paper 297M) and 483.9M
(Large, paper 484M); 65,536 gives 299.2M and 487.0M. `data.tokenizer.path` must name a
64k SentencePiece model (training one on COCO captions + ImageNet class names cannot reach
64k pieces).

Mesh presets (append to the variant, e.g. `configs/coca.py:large,v5p_128`); mesh.shape is
(data, fsdp, tensor), -1 takes the remaining devices:
  v4_32    TPU v4-32: 16 chips (32 TensorCores, one JAX device per megacore chip), 4 hosts.
           (-1, 16, 1): pure FSDP over all 16 chips. Giant's float32 parameters + gradients +
           Adafactor state (~2.2B x ~12 bytes = ~27 GB) do not fit one 32 GB chip with
           activations; split 16 ways they take ~1.7 GB per chip. data resolves to 1.
  v5p_128  TPU v5p-128: 64 chips (v5p names count TensorCores, 2 per chip), 16 hosts.
           (-1, 16, 1) = 4 data x 16 fsdp: FSDP groups of 16 chips keep the parameter
           all-gathers 16-way (cheaper than 64-way) while the state still fits easily.
  h100x8   one 8 x H100 node: (1, 8, 1), FSDP over NVLink. Replicating giant's state 8
           ways (pure data parallelism) would spend ~27 GB of each 80 GB GPU on it.
           Attention through cuDNN flash attention (model.attention_impl="cudnn").
Each preset sets grad_accum_steps and model.remat_policy from PRESET_MEMORY (examples per
device in one micro-batch, remat policy): the largest micro-batch that fits with at least
10% headroom and the least recompute, found by compiling the real step for the target
(`python -m mmjax.aot --config configs/coca.py:base,v4_32 --topology v4-32`, 2026-11-30,
uint8 images, fused caption loss; per device; rows dated in benchmarks/RESULTS.md):
  preset          micro-batch x steps  remat                     memory / capacity  headroom
  base,v4_32      256 x 16             dots_with_no_batch_dims   24.52 / 30.75 GiB  20.3%
  base,v5p_128    512 x 2              dots_with_no_batch_dims   43.44 / 95.74 GiB  54.6%
  base,h100x8     512 x 16             dots_with_no_batch_dims   45.89 / 71.20 GiB  35.5%
  large,v4_32     128 x 32             dots_with_no_batch_dims   24.29 / 30.75 GiB  21.0%
  large,v5p_128   512 x 2              dots_with_no_batch_dims   84.94 / 95.74 GiB  11.3%
  large,h100x8    256 x 32             dots_with_no_batch_dims   45.29 / 71.20 GiB  36.4%
  giant,v4_32     32 x 128             dots_with_no_batch_dims   16.18 / 30.75 GiB  47.4%
  giant,v5p_128   128 x 8              dots_with_no_batch_dims   49.57 / 95.74 GiB  48.2%
  giant,h100x8    128 x 64             dots_with_no_batch_dims   52.79 / 71.20 GiB  25.9%
(H100 capacity: 90% of 80 GB, launch/gpu.sh's XLA_PYTHON_CLIENT_MEM_FRACTION.) On TPU the
compiled FLOPs are 1.23-1.29x the model's with dots_with_no_batch_dims, and at most 0.02 of
that is remat: gradient caching's embedding pass costs (k-1)/k x 0.23 / 0.27 / 0.28
(base / large / giant) for k = grad_accum_steps > 2, the whole 0.23-0.28 for k = 2
(objectives/coca.py); giant,v5p_128 (k = 8) 1.25x. XLA:GPU's count leaves out cuDNN's
attention kernels.
Twice the micro-batch fits only with save_attention_recompute_mlp (the MLP recomputed) for
large,h100x8 (512: 11.5% headroom, 1.32x before the kept last forward) and giant,v5p_128
(256 x 4: 69.13 GiB, 27.8%, 1.32x); those presets keep the smaller micro-batch and the
fewer FLOPs. Exact gradient
caching keeps all 65,536 negatives whatever the micro-batch; tune it with
--config.grad_accum_steps.

Data: the paper's JFT-3B and ALIGN are not public. Half of each batch comes from the label
set `imagenet2012` (texts from class-name templates) and half from the caption set
`coco_captions` (Karpathy splits); override with e.g.
  --config.data.sources.labels.name=imagenet21k --config.data.sources.captions.name=...
Class names: CLIP's cleaned ImageNet names, chosen automatically for TFDS imagenet2012, whose
own names are WordNet ids (mmjax/data/classnames.py); prompts from WordNet ids are refused,
so a label set without a built-in name list needs
  --config.data.sources.labels.class_names=/path/names.txt  (one name per line, label order)
Templates: CLIP's 80 ImageNet prompts for training prompts and the zero-shot ensemble (our
choice: the paper says only that labels are treated as text).
Evaluation: zero-shot ImageNet (validation) and COCO 5K retrieval (Karpathy `test`).

Objective: the paper's CoCa (contrastive 1.0 + captioning 2.0, CLIP-style targets, no text
prefix). The mmjax extensions are one override away:
  --config.loss.label_aware=True --config.model.prefix_length=1
Optimizer (mmjax.optimizer.adafactor, which writes out the update rule). The paper states:
Adafactor with beta1 0.9, beta2 0.999 and decoupled weight decay 0.01; linear warmup over 2%
of the steps to 8e-4, then linear decay; batch 65,536, 500k steps. Where it is silent we
follow praxis ShardedAdafactor (the JAX port of lingvo's, the paper's codebase lineage) and
optax.adafactor:
  - beta1 0.9 is an EMA of the (learning-rate-scaled) updates, m = 0.9 m + 0.1 lr u, without
    bias correction; not heavy-ball momentum (optax.trace), whose steady update is 10x.
  - beta2 0.999 with Adam's bias correction folded into the decay (praxis decay_method
    "adam"): the second moment is Adam's bias-corrected average of g^2. A constant 0.999
    would scale the first updates by up to 1/sqrt(1 - 0.999) ~ 32x.
  - decoupled weight decay: each update subtracts 0.01 * lr_t * p (lr_t the scheduled rate,
    8e-4 at the peak), as praxis and AdamW do; biases, norm scales, position embeddings,
    learned queries / prefix / CLS and the logit scale are not decayed (our mask,
    optimizer.NO_DECAY_NAMES; praxis decays every variable).
  - Adafactor's own choices kept: epsilon 1e-30 added to g^2, update clipping at RMS 1.0
    (optimizer.update_clip_threshold), second moments factored over the two largest axes
    when both are >= 128 (optimizer.min_dim_size_to_factor; optax's rule), no relative step
    size or parameter scaling (the paper gives an absolute learning rate).
  - no global gradient clipping (optimizer.grad_clip_norm=0): the paper mentions none and
    Adafactor's update clipping bounds every step; --config.optimizer.grad_clip_norm=1.0
    restores it.
"""
import ml_collections

from configs import schema

VARIANTS = ("tiny", "base", "large", "giant")
MESHES = ("v4_32", "v5p_128", "h100x8")

# (vision width, depth, mlp_dim, heads), (text width, uni, multi, mlp_dim, heads)
SIZES = {
    "tiny": ((128, 2, 512, 4), (128, 1, 1, 512, 4)),
    "base": ((768, 12, 3072, 12), (768, 12, 12, 3072, 12)),
    "large": ((1024, 24, 4096, 16), (1024, 12, 12, 4096, 16)),
    "giant": ((1408, 40, 6144, 16), (1408, 18, 18, 5632, 16)),
}
# mesh preset -> (mesh.shape, number of devices it is meant for)
MESH_PRESETS = {
    "v4_32": ((-1, 16, 1), 16),
    "v5p_128": ((-1, 16, 1), 64),
    "h100x8": ((1, 8, 1), 8),
}
# GPU presets use cuDNN flash attention (model.attention_impl): on one H200 the CoCa-Base
# step (288 px, 256 per device, dots_with_no_batch_dims) took 239-240 ms against XLA's
# 268-269 ms, with 1.1 GiB less memory (benchmarks/RESULTS.md, "one GPU").
GPU_MESHES = ("h100x8",)
# (variant, mesh preset) -> (examples per device in one micro-batch, remat policy), chosen
# by compiling for the target with `python -m mmjax.aot` (figures: benchmarks/RESULTS.md);
# grad_accum_steps = batch_size / (devices x micro-batch).
PRESET_MEMORY = {
    ("base", "v4_32"): (256, "dots_with_no_batch_dims"),
    ("base", "v5p_128"): (512, "dots_with_no_batch_dims"),
    ("base", "h100x8"): (512, "dots_with_no_batch_dims"),
    ("large", "v4_32"): (128, "dots_with_no_batch_dims"),
    ("large", "v5p_128"): (512, "dots_with_no_batch_dims"),
    ("large", "h100x8"): (256, "dots_with_no_batch_dims"),
    ("giant", "v4_32"): (32, "dots_with_no_batch_dims"),
    ("giant", "v5p_128"): (128, "dots_with_no_batch_dims"),
    ("giant", "h100x8"): (128, "dots_with_no_batch_dims"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, *modifiers = (arg or "base").split(",")
  if variant not in VARIANTS or len(modifiers) > 1 or set(modifiers) - set(MESHES):
    raise ValueError(f"configs/coca.py:{arg}: choose a variant {VARIANTS}, optionally "
                     f"followed by one mesh preset ',{{{'|'.join(MESHES)}}}'")
  c = schema.base(model="coca", objective="coca")
  c.name = f"coca:{arg or variant}"
  schema.pod_scale_run(c)
  c.batch_size = 65536  # global, over all processes (paper)
  c.total_steps = 500_000  # paper
  c.eval_batch_size = 1024

  # 64 text tokens incl. BOS/EOS: the paper does not state its text length; 64 holds COCO
  # captions and most alt-texts. It only sizes the 64-row text position table and the FLOPs.
  d = c.data
  d.image_size = 288
  d.max_text_len = 64
  d.tokenizer.path = ""  # set to a 64k SentencePiece .model (see the docstring)
  d.tokenizer.vocab_size = 64_000
  d.augment.flip = False  # captions may say "left"/"right"
  d.sources.labels = schema.source("imagenet2012", kind="label", label_key="label",
                                   weight=0.5)
  d.label_template_set = "openai_imagenet_80"  # our choice (see the docstring)
  # tfds coco_captions: captions = Sequence({"text": str, "id": int64}), decoded as a dict of
  # lists, so the texts are at the nested path captions/text.
  d.sources.captions = schema.source("coco_captions", kind="caption",
                                     text_key="captions/text", weight=0.5)

  m = c.model
  m.patch_size = 18  # 288 / 18 = 16 x 16 = 256 image tokens (paper)
  (vw, vd, vm, vh), (tw, nu, nm, tm, th) = SIZES[variant]
  m.vision.update(width=vw, depth=vd, mlp_dim=vm, num_heads=vh)
  m.text.update(width=tw, num_uni_layers=nu, num_multi_layers=nm, mlp_dim=tm, num_heads=th)
  # The paper does not give the embedding width; the text width keeps the projections square.
  m.embed_dim = tw
  m.pooler = "cascade"  # paper default (ablation: cascade > parallel)
  m.num_caption_queries = 256  # paper
  m.tie_embeddings = False  # the paper's decoder counts include two vocab tables
  m.prefix_length = 0  # paper: no prefix conditioning
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.scan_layers = True  # one compiled layer per stack: compile time flat in depth
  # Save the outputs of weight matmuls (projections, MLP) and recompute the rest (norms,
  # GELU, attention probabilities): ~1/3 of the backward recompute of "full" at a fraction
  # of the memory of "none". Use "full" if a large variant runs out of memory.
  m.remat_policy = "dots_with_no_batch_dims"

  c.loss.label_aware = False  # paper: CLIP-style targets (every pair its own class)
  # Captioning head fused with its loss, 8 of the 63 token positions at a time: at 256
  # examples per device the gradient's temporaries are 1.1 GiB instead of 7.9 GiB
  # (benchmarks/caption_loss.py); equal to the plain logits' loss and gradients.
  c.loss.caption_chunk_size = 8

  o = c.optimizer
  o.name = "adafactor"
  o.learning_rate = 8e-4
  o.schedule = "linear"
  o.warmup_steps = c.get_ref("total_steps") // 50  # 2% warmup, following total_steps
  o.weight_decay = 0.01
  o.b1 = 0.9
  o.b2 = 0.999
  o.grad_clip_norm = 0.0  # the paper mentions no gradient clipping

  c.checkpoint.keep_period = 50_000
  c.evals.retrieval = schema.retrieval_eval("coco_captions", split="test",
                                            num_examples=5000)  # Karpathy 5K test
  c.evals.retrieval.text_key = "captions/text"
  # ImageNet prompts among its 1000 classes. With imagenet2012's labels a training source
  # (data.sources.labels) this is closed-set accuracy on training classes, not zero-shot
  # transfer; point it at a label dataset whose classes no training source has for a
  # zero-shot number.
  c.evals.zeroshot = schema.zeroshot_eval("imagenet2012", num_examples=50_000)
  c.evals.captioning = schema.captioning_eval("coco_captions", split="test",
                                              num_examples=5000)
  c.evals.captioning.update(text_key="captions/text", strategy="beam", beam_size=3)
  c.evals.captioning.max_new_tokens = c.data.get_ref("max_text_len") - 1
  # ImageNet linear probe, off (num_examples=0) during pretraining: the logistic fit runs on
  # the host in float64 NumPy, ~120 GFLOP per L-BFGS step at 40k x 768 features x 1000
  # classes. On a checkpoint: mmjax.evaluate ... --config.evals.linear_probe.num_examples=N
  c.evals.linear_probe = schema.linear_probe_eval("imagenet2012", num_train=50_000,
                                                  num_examples=0)

  if variant == "tiny":
    shrink_to_tiny(c)
  if modifiers:
    shape, num_devices = MESH_PRESETS[modifiers[0]]
    c.mesh.shape = shape
    if variant == "tiny":  # a smoke test on the real machine: 2 examples per device
      c.batch_size = max(c.batch_size, 2 * num_devices)
    micro_batch, remat = PRESET_MEMORY.get((variant, modifiers[0]), (256, "none"))
    c.grad_accum_steps = max(1, c.batch_size // (num_devices * micro_batch))
    if variant != "tiny":
      c.model.remat_policy = remat
    if modifiers[0] in GPU_MESHES and c.model.dtype == "bfloat16":
      c.model.attention_impl = "cudnn"
  c.lock()
  return c


def shrink_to_tiny(c: ml_collections.ConfigDict) -> None:
  """The same recipe and data names at toy size: seconds per step on a CPU."""
  schema.smoke_test_run(c)
  c.data.image_size = 64
  c.model.patch_size = 16  # 16 image tokens
  c.data.max_text_len = 16
  c.data.num_workers = 0
  c.data.tokenizer.vocab_size = 1024
  c.model.num_caption_queries = 8
  c.model.embed_dim = 64
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.evals.retrieval.num_examples = 64
  c.evals.zeroshot.num_examples = 64
  c.evals.captioning.num_examples = 16
