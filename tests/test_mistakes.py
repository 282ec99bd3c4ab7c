"""A new user's first hour: plausible mistakes on every command each end as one line
`mmjax.<command>: error: ...` naming the flag, config key, file or dataset and what to do,
with exit status 2, never a traceback, and before any compile.

Every command line runs as `python -m mmjax.<command>` would, each in its own process
forked from one that imported the libraries once (tests/forked_commands.py), so the file
stays fast. The config-validation rules themselves are tested in tests/test_cli.py.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

TINY = ("--config", "configs/shapes.py:coca_unicl_prefix,tiny")


@dataclasses.dataclass(frozen=True)
class Mistake:
  name: str
  module: str
  args: tuple[str, ...]
  message: str  # a regex the error line must match (after "mmjax.<command>: error: ")
  devices: int = 1
  cwd: str = REPO
  only_line: bool = True  # False: library warnings may precede the error line

  def __str__(self) -> str:
    return self.name


def train(name, *args, message, **kw):
  return Mistake(name, "mmjax.train", args, message, **kw)


# {tmp}: a scratch folder (a file `afile`, an empty folder `empty`, a text file `notes.txt`, a
# CSV with the wrong header `bad.csv`, a folder `pets/cat/` without images, a workdir whose
# step 5 holds nothing `partial/checkpoints/5/`); {data}: the built shapes datasets.
W = ("--workdir", "{tmp}/w")
MISTAKES = [
    train("no flags",
          message=r"(?=.*--config must have a value)(?=.*--workdir must have a value)"),
    train("no workdir", "--config", "configs/shapes.py", message=r"--workdir must have a value"),
    train("no config", *W, message=r"--config must have a value"),
    train("config path typo", "--config", "configs/shape.py", *W,
          message=r"--config=configs/shape.py: .*No such file.*did you mean configs/shapes.py"),
    train("run from another folder", "--config", "configs/shapes.py", *W, cwd="/",
          message=r"configs/shapes.py.*\(relative to /\): run from .* or pass "
                  r"--config=/.*/configs/shapes.py"),
    train("preset typo", "--config", "configs/shapes.py:typo", *W,
          message=r"configs/shapes.py:typo: choose one of .*'coca_unicl_prefix'"),
    train("modifier typo", "--config", "configs/shapes.py:clip,tinyy", *W,
          message=r"clip,tinyy: choose one of .* ',long' or ',tiny'"),
    train("modifier without preset", "--config", "configs/shapes.py:tiny", *W,
          message=r"configs/shapes.py:tiny: choose one of"),
    train("key typo", *TINY, *W, "--config.batch_sise=32",
          message=r"unknown config key 'batch_sise' .*did you mean \"batch_size\""),
    train("section typo", *TINY, *W, "--config.optimiser.learning_rate=1e-3",
          message=r"unknown config key 'optimiser'.*did you mean \"optimizer\""),
    train("text for an int", *TINY, *W, "--config.total_steps=ten",
          message=r"--config.total_steps=ten: invalid literal for int"),
    train("float for an int", *TINY, *W, "--config.total_steps=1.5",
          message=r"--config.total_steps=1.5"),
    train("float typo", *TINY, *W, "--config.optimizer.learning_rate=1e-3x",
          message=r"--config.optimizer.learning_rate=1e-3x: could not convert"),
    train("bool typo", *TINY, *W, "--config.model.scan_layers=yes",
          message=r"--config.model.scan_layers=yes: .*boolean"),
    train("value for a section", *TINY, *W, "--config.model.vision=3",
          message=r"--config.model.vision=3: .*not a dict"),
    train("negative steps", *TINY, *W, "--config.total_steps=-5",
          message=r"^config total_steps=-5 must be positive$"),
    train("zero batch", *TINY, *W, "--config.batch_size=0",
          message=r"^config batch_size=0 must be positive$"),
    train("negative cadence", *TINY, *W, "--config.log_every_steps=-1",
          message=r"config log_every_steps=-1 must be >= 0"),
    train("dtype typo", *TINY, *W, "--config.model.dtype=bfloat61",
          message=r"^config model.dtype='bfloat61': choose one of \['float32', 'bfloat16'"),
    train("image size vs patch", *TINY, *W, "--config.data.image_size=30",
          message=r"model.image_size=30 is not divisible by model.patch_size=8"),
    train("batch not divisible by the devices", *TINY, *W, "--config.batch_size=15",
          devices=2, message=r"^config batch_size=15 is not divisible by the data-parallel "
                             r"size 2 \(mesh.shape \(2, 1, 1\)"),
    train("mesh larger than the devices", *TINY, *W, "--config.mesh.shape=(2,1,1)",
          message=r"mesh.shape=\(2, 1, 1\) has 2 devices but 1 are available"),
    train("mesh of 2 axes", *TINY, *W, "--config.mesh.shape=(1,1)",
          message=r"mesh.shape=\(1, 1\) must have 3 entries"),
    train("flag typo", *TINY, "--work_dir", "{tmp}/w",
          message=r"Unknown command line flag 'work_dir'. Did you mean: workdir"),
    train("config given without --config", "configs/shapes.py", *W,
          message=r"--config must have a value"),
    train("workdir is a file", *TINY, "--workdir", "{tmp}/afile",
          message=r"--workdir {tmp}/afile: a file is in the way"),
    train("workdir cannot be created", *TINY, "--workdir", "/proc/mmjax_workdir",
          message=r"--workdir /proc/mmjax_workdir: cannot create it or write in it"),
    train("data_dir is a file", *TINY, *W, "--config.data_dir={tmp}/afile",
          message=r"data_dir {tmp}/afile is a file: point config data_dir at a writable"),
    train("data_dir cannot be created", *TINY, *W, "--config.data_dir=/proc/mmjax_data",
          message=r"data_dir /proc/mmjax_data cannot be written"),
    train("dataset typo", *TINY, *W, "--config.data_dir={data}",
          "--config.data.sources.labels.name=shapes/lables",
          message=r"dataset 'shapes/lables' \(config data.sources.labels.name\) does not "
                  r"exist: the embedded shapes datasets are shapes/labels, "),
    train("dataset not in data_dir", *TINY, *W, "--config.data_dir={data}",
          "--config.data.sources.labels.name=imagenet2012",
          message=r"dataset 'imagenet2012' \(config data.sources.labels.name\) is not in "
                  r"{data} .*tfds build imagenet2012"),
    train("split typo", *TINY, *W, "--config.data_dir={data}",
          "--config.data.sources.labels.split=tain",
          message=r"has no split 'tain' \(config data.sources.labels.split\); it has train"),
    train("feature typo", *TINY, *W, "--config.data_dir={data}",
          "--config.data.sources.captions.text_key=caption",
          message=r"no text feature 'caption' \(config data.sources.captions.text_key\)"),
    train("evaluation dataset typo", *TINY, *W, "--config.data_dir={data}",
          "--config.evals.zeroshot.dataset=shapes/unseen",
          message=r"'shapes/unseen' \(config evals.zeroshot.dataset\) does not exist"),
    train("tokenizer file missing", *TINY, *W, "--config.data_dir={data}",
          "--config.data.tokenizer.path={tmp}/sp.model",
          message=r"data.tokenizer.path='{tmp}/sp.model': no such file"),
    train("tokenizer not a model", *TINY, *W, "--config.data_dir={data}",
          "--config.data.tokenizer.path={tmp}/notes.txt",
          message=r"data.tokenizer.path='{tmp}/notes.txt': not a SentencePiece model"),
    Mistake("evaluate an empty workdir", "mmjax.evaluate", (*TINY, "--workdir", "{tmp}/empty"),
            r"no checkpoint in {tmp}/empty/checkpoints .*mmjax.train writes"),
    Mistake("evaluate a step that is not there", "mmjax.evaluate",
            (*TINY, "--workdir", "{tmp}/partial", "--step", "999"),
            r"--step 999: no such checkpoint in .*; it has steps 5"),
    Mistake("evaluate --step as text", "mmjax.evaluate",
            (*TINY, "--workdir", "{tmp}/partial", "--step", "last"),
            r"--step=last: invalid literal for int"),
    Mistake("evaluate a partly copied checkpoint", "mmjax.evaluate",
            (*TINY, "--workdir", "{tmp}/partial", "--config.data_dir={data}"),
            r"checkpoint step 5 in .* is incomplete .*copy the whole step folder",
            only_line=False),  # Orbax warns about the missing metadata first
    Mistake("aot without a target", "mmjax.aot", ("--config", "configs/coca.py:base"),
            r"--topology must have a value"),
    Mistake("aot target typo", "mmjax.aot",
            ("--config", "configs/coca.py:base", "--topology", "v4-33"),
            r"unknown topology 'v4-33'; known: TPU v4-"),
    Mistake("aot program typo", "mmjax.aot",
            ("--config", "configs/coca.py:base", "--topology", "v4-8", "--what", "train,foo"),
            r"--what='train,foo': choose from train,eval,decode"),
    Mistake("aot zero slices", "mmjax.aot",
            ("--config", "configs/coca.py:base", "--topology", "v4-8", "--num_slices", "0"),
            r"--num_slices=0 must be >= 1"),
    Mistake("build with no input", "mmjax.data.build", ("--name", "x"),
            r"give --name and exactly one of --images_dir / --captions_file"),
    Mistake("build from a missing folder", "mmjax.data.build",
            ("--images_dir", "{tmp}/nope", "--name", "x", "--data_dir", "{tmp}/ds"),
            r"--images_dir {tmp}/nope: no such folder"),
    Mistake("build from a file as folder", "mmjax.data.build",
            ("--images_dir", "{tmp}/afile", "--name", "x", "--data_dir", "{tmp}/ds"),
            r"--images_dir {tmp}/afile: no such folder"),
    Mistake("build from a missing CSV", "mmjax.data.build",
            ("--captions_file", "{tmp}/nope.csv", "--name", "x", "--data_dir", "{tmp}/ds"),
            r"--captions_file {tmp}/nope.csv: no such file"),
    Mistake("build from a CSV with other columns", "mmjax.data.build",
            ("--captions_file", "{tmp}/bad.csv", "--name", "x", "--data_dir", "{tmp}/ds"),
            r"bad.csv: no column 'image' \(--image_column\).* 'img', 'text'"),
    Mistake("build with a name TFDS refuses", "mmjax.data.build",
            ("--images_dir", "{tmp}/pets", "--name", "My Pets", "--data_dir", "{tmp}/ds"),
            r"--name 'My Pets': .*use --name my_pets"),
    Mistake("build with a fraction above 1", "mmjax.data.build",
            ("--images_dir", "{tmp}/pets", "--name", "x", "--val_fraction", "1.5"),
            r"--val_fraction 1.5: must be in \[0, 1\)"),
    Mistake("preview into a missing folder", "mmjax.data.preview",
            (*TINY, "--config.data_dir={data}", "--out", "{tmp}/no/such/batch.png"),
            r"--out {tmp}/no/such/batch.png: no such folder {tmp}/no/such"),
    Mistake("preview zero batches", "mmjax.data.preview",
            (*TINY, "--config.data_dir={data}", "--num_batches", "0"),
            r"--num_batches 0: must be at least 1"),
]


def scratch_files(tmp: str) -> None:
  os.makedirs(os.path.join(tmp, "empty"))
  os.makedirs(os.path.join(tmp, "pets", "cat"))
  os.makedirs(os.path.join(tmp, "partial", "checkpoints", "5"))
  for name, text in (("afile", "not a folder\n"), ("notes.txt", "not a model\n"),
                     ("bad.csv", "img,text\na.png,a cat\n"),
                     (os.path.join("pets", "cat", "notes.txt"), "not an image\n")):
    with open(os.path.join(tmp, name), "w") as f:
      f.write(text)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, data_dir):
  tmp = str(tmp_path_factory.mktemp("mistakes"))
  scratch_files(tmp)
  # Each its own workdir: two children at once must not meet at a workdir's lock.
  fill = lambda text, i: text.replace("{tmp}/w", f"{tmp}/w{i}").replace(
      "{tmp}", tmp).replace("{data}", data_dir)
  cases = [{"module": m.module, "args": [fill(a, i) for a in m.args], "cwd": m.cwd,
            "env": {"JAX_NUM_CPU_DEVICES": str(m.devices)}, "timeout": 300}
           for i, m in enumerate(MISTAKES)]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "forked_commands.py")],
                        input=json.dumps(cases), capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, dict(zip(MISTAKES, json.loads(proc.stdout)))


@pytest.mark.parametrize("mistake", MISTAKES, ids=str)
def test_a_mistake_is_one_line_naming_the_fix_with_exit_status_2(outcomes, mistake, data_dir):
  tmp, results = outcomes
  result = results[mistake]
  lines = [line for line in result["stderr"].splitlines() if line.strip()]
  assert result["returncode"] == 2, result
  assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
  assert lines and (len(lines) == 1 or not mistake.only_line), lines
  prefix = f"{mistake.module}: error: "
  assert lines[-1].startswith(prefix), lines
  pattern = mistake.message.replace("{tmp}", re.escape(tmp)).replace("{data}",
                                                                     re.escape(data_dir))
  assert re.search(pattern, lines[-1][len(prefix):]), lines[-1]


def test_the_mistakes_fail_before_any_compile(outcomes):
  """Nothing was compiled or trained: no memory line of the compiled step, no step line."""
  _, results = outcomes
  compiled = [str(m) for m, r in results.items()
              if "Train step memory" in r["stdout"] or re.search(r"^step \d+/", r["stdout"], re.M)]
  assert not compiled, compiled
