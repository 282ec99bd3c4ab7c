"""Config validation: every mistake fails before any device memory is allocated or anything
is compiled, with a message naming the config key."""
import subprocess
import time

import pytest

import helpers
from mmjax import cli
from test_train import REPO, command, environment


def fails_via_cli(*overrides, devices=1):
  start = time.time()
  proc = subprocess.run(command("mmjax.train", "/nonexistent/workdir", "/nonexistent/data",
                                *overrides), cwd=REPO, env=environment(devices),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0, proc.stdout[-2000:]
  return proc.stderr, time.time() - start


def test_unknown_key_suggests_the_right_one():
  err, _ = fails_via_cli("--config.batch_sise=8")
  assert "batch_sise" in err and "Did you mean" in err and "batch_size" in err, err[-2000:]


def test_wrong_type_names_the_key():
  err, _ = fails_via_cli("--config.total_steps=ten")
  assert "total_steps" in err and "ten" in err, err[-2000:]


def test_batch_not_divisible_fails_before_compiling():
  err, seconds = fails_via_cli("--config.batch_size=12", devices=8)
  assert ("mmjax.train: error: config batch_size=12 is not divisible by the data-parallel "
          "size 8") in err, err[-2000:]
  assert "Traceback" not in err
  assert seconds < 120  # no dataset, tokenizer or compile work happened (workdir is bogus)


@pytest.mark.parametrize("overrides, devices, message", [
    ({"mesh.shape": (2, 2, 1)}, 8, r"mesh.shape=\(2, 2, 1\) has 4 devices but 8 are available"),
    ({"mesh.shape": (-1, 3, 1)}, 8, r"mesh.shape=\(-1, 3, 1\): 8 devices are not divisible by 3"),
    ({"batch_size": 12, "mesh.shape": (1, 8, 1)}, 8,
     r"batch_size=12 is not divisible by the data-parallel size 8"),
    ({"grad_accum_steps": 3}, 1, r"grad_accum_steps=3: batch_size=16"),
    ({"data.sources.labels.weight": 0.0, "data.sources.captions.weight": 0.0}, 1,
     r"data.sources.\*.weight=.*sum to a positive number"),
    ({"data.sources.labels.weight": -1.0}, 1, r"data.sources.\*.weight="),
    ({"model.remat_policy": "sometimes"}, 1, r"model.remat_policy='sometimes': choose one of"),
    ({"optimizer.name": "sgd"}, 1, r"optimizer.name='sgd'"),
    ({"model.pooler": "mean"}, 1, r"model.pooler='mean'"),
    ({"loss.name": "siglip2"}, 1, r"loss.name='siglip2': choose one of"),
    ({"loss.name": "siglip"}, 1,
     r"^config model.logit_bias=False: loss.name='siglip' needs .* set model.logit_bias=True$"),
    ({"evals.zeroshot.type": "zero_shot"}, 1, r"evals.zeroshot.type='zero_shot'"),
    ({"evals.zeroshot.prefix": "title"}, 1, r"evals.zeroshot.prefix='title'"),
    ({"evals.captioning.strategy": "nucleus"}, 1, r"evals.captioning.strategy='nucleus'"),
    ({"data.sources.captions.modality": "text"}, 1,
     r"data.sources.captions.modality='text': unimodal views need .*loss.name='flava'"),
    ({"data.tokenizer.kind": "bpe"}, 1, r"data.tokenizer.kind='bpe'"),
    ({"nonfinite_policy": "ignore"}, 1, r"nonfinite_policy='ignore'"),
    ({"checkpoint.max_to_keep": 0}, 1, r"checkpoint.max_to_keep=0"),
    ({"total_steps": 0}, 1, r"total_steps=0"),
])
def test_validate_names_the_key(overrides, devices, message):
  with pytest.raises(cli.ConfigError, match=message):
    cli.validate(helpers.tiny_config(**overrides), num_devices=devices)


def test_every_problem_is_reported_one_line_each():
  config = helpers.tiny_config(**{"total_steps": 0, "model.remat_policy": "x",
                                  "evals.linear_probe.classifier": "svm"})
  with pytest.raises(cli.ConfigError) as e:
    cli.validate(config, num_devices=1)
  lines = str(e.value).splitlines()
  assert len(lines) == 3 and all(line.startswith("config ") for line in lines), lines


def test_a_source_with_weight_zero_is_off():
  cli.validate(helpers.tiny_config(**{"data.sources.labels.weight": 0.0}), num_devices=1)


def test_valid_configs_pass():
  cli.validate(helpers.tiny_config(), num_devices=1)
  cli.validate(helpers.tiny_config(**{"mesh.shape": (2, 4, 1)}), num_devices=8)
  cli.validate(helpers.tiny_config("siglip", **{"mesh.shape": (2, 2, 2)}), num_devices=8)
