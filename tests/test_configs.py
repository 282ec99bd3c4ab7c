"""configs/: every config follows the schema; coca.py's variants and mesh presets load, lock,
validate and override."""
import dataclasses
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import coca, flava, openclip, schema, shapes
from mmjax import cli, evaluators, models, objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "coca.py")


def _keys(config: ml_collections.ConfigDict) -> set[str]:
  return set(config.to_dict().keys()) | {
      f"{k}.{sub}" for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)
      for sub in _keys(v)}


@pytest.mark.parametrize("mesh", [None, *coca.MESHES])
@pytest.mark.parametrize("variant", coca.VARIANTS)
def test_variants_and_meshes_load_lock_and_validate(variant, mesh):
  config = coca.get_config(variant if mesh is None else f"{variant},{mesh}")
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.new_key = 1
  with pytest.raises(AttributeError):
    config.model.vision.new_key = 1
  num_devices = 1 if mesh is None else coca.MESH_PRESETS[mesh][1]
  cli.validate(config, num_devices=num_devices)
  if mesh is not None and variant != "tiny":  # the measured micro-batch and remat policy
    micro_batch, remat = coca.PRESET_MEMORY[variant, mesh]
    assert config.batch_size // (config.grad_accum_steps * num_devices) == micro_batch
    assert config.model.remat_policy == remat
  # Same key structure as configs/shapes.py outside `evals` (each config lists its own
  # evaluators; commands iterate over them), so every command reads either file.
  outside_evals = lambda keys: {k for k in keys if not k.startswith("evals.")}
  assert outside_evals(_keys(config)) == outside_evals(_keys(shapes.get_config()))


REGISTRIES = {"model": models.MODELS, "loss": objectives.OBJECTIVES,
              "eval": evaluators.EVALUATORS}


@pytest.mark.parametrize("kind", REGISTRIES)
def test_each_registry_entry_owns_its_schema_section_and_check(kind):
  """Registry names and schema sections are the same sets, each entry points at its own
  section and has a check: so a new entry is its module, its registry line and its
  section, and nothing else needs to list it (this file included)."""
  registry, sections = REGISTRIES[kind], schema.sections(kind)
  assert set(registry) == set(sections)
  for name, entry in registry.items():
    assert entry.section is sections[name], name
    assert callable(entry.check), name
  selector = "type" if kind == "eval" else "name"  # the key that picks the entry
  assert {name: sections[name]()[selector] for name in registry} == {n: n for n in registry}


@pytest.mark.parametrize("name", models.MODELS)
def test_model_configs_mirror_the_schema_section(name):
  """A model's config class has the `model` section's keys as fields, nested sections as
  nested dataclasses, with the section's values (nothing renamed or dropped)."""
  config = schema.base(model=name, objective="flava" if name == "flava" else "coca")
  model_config = models.MODELS[name].config_class.from_config(config)

  def as_dict(dc):
    return {f.name: as_dict(getattr(dc, f.name)) if dataclasses.is_dataclass(
        getattr(dc, f.name)) else getattr(dc, f.name) for f in dataclasses.fields(dc)}

  given = {"max_text_len", "mim_outputs"}  # read from `data` and `loss`
  mirrored = {k: v for k, v in as_dict(model_config).items() if k not in given}
  assert mirrored == config.model.to_dict()


@pytest.mark.parametrize("config", [
    shapes.get_config(), shapes.get_config("clip,tiny"), shapes.get_config("siglip"),
    coca.get_config("giant,v5p_128"),
    flava.get_config("tiny"), flava.get_config("full"), openclip.get_config("coca_tiny")],
    ids=lambda c: c.name)
def test_every_config_has_exactly_the_schema_keys(config):
  """Configs change values, never the key structure: the schema's sections for the config's
  model and objective, sources and evaluators shaped like the schema's."""
  expected = schema.base(model=config.model.name, objective=config.loss.name)
  outside = lambda keys: {k for k in keys if not k.startswith(("data.sources.", "evals."))}
  assert outside(_keys(config)) == outside(_keys(expected))
  for source in config.data.sources.values():
    assert _keys(source) == _keys(schema.source("x", kind="label", weight=1.0))
  for entry in config.evals.values():
    assert _keys(entry) == _keys(evaluators.EVALUATORS[entry.type].section())


def test_paper_recipe():
  c = coca.get_config("large")
  assert (c.data.image_size, c.model.patch_size, c.model.num_caption_queries) == (288, 18, 256)
  assert c.model.text.vocab_size == c.data.tokenizer.vocab_size == 64000
  assert (c.model.pooler, c.model.tie_embeddings, c.model.dtype) == ("cascade", False,
                                                                     "bfloat16")
  assert (c.batch_size, c.total_steps, c.optimizer.warmup_steps) == (65536, 500_000, 10_000)
  o = c.optimizer
  assert (o.name, o.schedule, o.learning_rate, o.b1, o.b2, o.weight_decay) == (
      "adafactor", "linear", 8e-4, 0.9, 0.999, 0.01)
  assert (o.grad_clip_norm, o.update_clip_threshold) == (0.0, 1.0)  # see the docstring
  assert (c.loss.contrastive_weight, c.loss.caption_weight) == (1.0, 2.0)
  assert c.data.sources.labels.name == "imagenet2012"
  assert c.data.sources.captions.text_key == "captions/text"


def test_bad_argument_names_the_choices():
  with pytest.raises(ValueError, match="variant"):
    coca.get_config("huge")
  with pytest.raises(ValueError, match="mesh"):
    coca.get_config("base,v3_8")


def test_command_line_overrides():
  """As the train/summary commands parse them (config_flags, file loaded by path)."""
  c = _parse([f"--config={CONFIG_FILE}:base,h100x8",
              "--config.data.sources.labels.name=imagenet21k", "--config.total_steps=1000",
              "--config.model.remat_policy=full"])
  assert c.data.sources.labels.name == "imagenet21k"
  assert c.optimizer.warmup_steps == 20  # 2% follows total_steps
  assert c.model.remat_policy == "full" and c.mesh.shape == (1, 8, 1)
  with pytest.raises((flags.Error, AttributeError), match="labels_name"):  # a typo fails
    _parse([f"--config={CONFIG_FILE}:base", "--config.data.sources.labels_name=x"])


def _parse(args: list[str]) -> ml_collections.ConfigDict:
  """config_flags reads the overrides from argv (sys.argv unless given)."""
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_linear_probe_keys_do_not_move_the_zero_shot_evaluator():
  """The probe copies the zero-shot dataset's names and sizes; overriding either leaves the
  other alone (a shared FieldReference would silently change both)."""
  full = flava.get_config("full")
  assert (full.evals.zeroshot.num_examples, full.evals.linear_probe.num_examples) == (50_000, 0)
  c = _parse([f"--config={CONFIG_FILE}:base", "--config.evals.linear_probe.num_examples=10000",
              "--config.evals.linear_probe.dataset=imagenet_v2"])
  assert c.evals.zeroshot.num_examples == 50_000 and c.evals.zeroshot.dataset == "imagenet2012"
  assert c.evals.linear_probe.dataset == "imagenet_v2"


def test_flava_full_schedules_the_papers_phases_on_the_papers_data():
  """Unimodal encoders first (MLM + MIM on image-only / text-only sources), MLM on text-only
  data, the MIM-target deviation explicit; tiny trains the same way, on the seen classes."""
  full, tiny = flava.get_config("full"), flava.get_config("tiny")
  assert 0 < full.loss.unimodal_steps < full.total_steps
  assert 0 < tiny.loss.unimodal_steps < tiny.total_steps
  for c in (full, tiny):
    assert (c.loss.mlm_on_paired, c.loss.mim_on_paired, c.loss.mim_target) == (
        False, False, "pixels")
    modalities = {s.modality for s in c.data.sources.values() if s.weight > 0}
    assert modalities == {"paired", "image", "text"}
  assert full.data.sources.images.name == "imagenet2012"  # images only: zero-shot stays so
  assert {s.name for s in tiny.data.sources.values() if s.kind == "label"} == {
      "shapes/labels_seen"}
  assert (tiny.evals.zeroshot.dataset, tiny.evals.seen_classes.dataset) == (
      "shapes/labels_unseen", "shapes/labels_seen")
