"""README "Your own data", executed as written: its fenced bash block runs under bash with
HOME set to a scratch folder holding `~/pets` (a label folder) and `~/pairs.csv` (a caption
CSV written by Excel: BOM, CRLF, quoted commas) whose images are real photos in every
Pillow mode, plus truncated, empty and non-image files. The only test-side change: a
`python` shell function runs this venv's interpreter and, for mmjax.train / evaluate /
preview, the seconds-long model (`configs/shapes.py` becomes `...:coca_unicl_prefix,tiny`,
the shared XLA cache). Then the trained-on pixels are checked against the expected RGB.
"""
import ast
import json
import os
import re
import sys

import numpy as np
import pytest

import helpers
import image_files
from conftest import CACHE_DIR, REPO
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import pipeline, sources, transforms

SHIM = """
python() {
  local args=()
  for a in "$@"; do
    [[ $a == configs/shapes.py ]] && a=configs/shapes.py:coca_unicl_prefix,tiny
    args+=("$a")
  done
  if [[ $2 == mmjax.train || $2 == mmjax.evaluate || $2 == mmjax.data.preview ]]; then
    args+=("--config.compilation_cache_dir=$XLA_CACHE")
    printf '%s\\n' "${args[@]}" > "$HOME/args_$2.txt"
  fi
  "$VENV_PYTHON" "${args[@]}"
}
"""


def readme_block() -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
  (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
  return block


def write_user_files(home: str) -> dict[str, np.ndarray]:
  """~/pets/<class>/..., ~/pairs.csv + ~/photos/...; returns file_name -> expected RGB."""
  zoo, bad = image_files.image_zoo(), image_files.bad_files()
  expected = {}
  for i, case in enumerate(zoo):
    cls = ("cat", "dog", "fish")[i % 3]
    os.makedirs(os.path.join(home, "pets", cls), exist_ok=True)
    with open(os.path.join(home, "pets", cls, case.name), "wb") as f:
      f.write(case.data)
    expected[f"{cls}/{case.name}"] = case.expected
  os.makedirs(os.path.join(home, "pets", "empty_class"))
  rows = ["image,caption"]
  os.makedirs(os.path.join(home, "photos"))
  for i, case in enumerate(zoo):
    with open(os.path.join(home, "photos", case.name), "wb") as f:
      f.write(case.data)
    expected[f"photos/{case.name}"] = case.expected
    rows.append(f'photos/{case.name},"photo {i}, {case.name.split(".")[0].replace("_", " ")}"')
  for name, data in bad.items():
    for folder in ("pets/cat", "photos"):
      with open(os.path.join(home, folder, name), "wb") as f:
        f.write(data)
    rows.append(f"photos/{name},a broken file")
  with open(os.path.join(home, "pets", "dog", "notes.txt"), "w") as f:
    f.write("not an image\n")
  with open(os.path.join(home, "pairs.csv"), "w", encoding="utf-8-sig", newline="") as f:
    f.write("\r\n".join(rows) + "\r\n")
  return expected


def literal(text: str):
  """A command-line value as the flag parser reads it: a Python literal, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def config_from(args_file: str, home: str):
  """The config the shim's mmjax command ran with (its --config.* overrides applied)."""
  with open(args_file) as f:
    args = f.read().split("\n")
  spec = args[args.index("--config") + 1]  # the README writes "--config FILE"
  overrides = {}
  for a in args:
    if a.startswith("--config.") and "compilation_cache" not in a:
      key, value = a[len("--config."):].split("=", 1)
      overrides[key] = literal(value.replace("~", home))
  return helpers.override(helpers.shapes.get_config(spec.split(":", 1)[1]), **overrides)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  home = str(tmp_path_factory.mktemp("home"))
  expected = write_user_files(home)
  proc = helpers.call(["bash", "-e", "-c", SHIM + readme_block()], timeout=1200,
                      env={"HOME": home, "VENV_PYTHON": sys.executable, "XLA_CACHE": CACHE_DIR})
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return home, expected, proc.stdout


def test_the_builds_leave_out_and_list_the_bad_files(recipe):
  _, _, out = recipe
  for name in image_files.bad_files():
    assert f"cat/{name}: " in out and f"(photos/{name}): " in out
  assert "class folder 'empty_class' holds no images" in out
  assert "dog/notes.txt" in out
  assert "--config.data.sources.labels.name=my_pets" in out
  assert "--config.evals.retrieval.dataset=my_pairs" in out


def test_train_and_evaluate_ran_on_the_users_data(recipe):
  home, _, _ = recipe
  workdir = os.path.join(home, "runs", "mine")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  train = [m for m in logged if "loss" in m]
  assert train and train[-1]["data/skipped"] == 0  # the builder left the bad files out
  (result,) = [f for f in os.listdir(os.path.join(workdir, "eval")) if f.endswith(".json")]
  with open(os.path.join(workdir, "eval", result)) as f:
    evaluated = json.load(f)
  for key in ("seen_classes/my_pets/top1", "linear_probe/my_pets/top1",
              "retrieval/my_pairs/i2t_r1", "caption/my_pairs/cider"):
    assert key in evaluated, sorted(evaluated)
  step = evaluated["step"]
  assert os.path.exists(os.path.join(workdir, "eval", f"samples_{step}.png"))
  assert os.path.exists(os.path.join(home, "batch.png"))


def test_every_record_decodes_to_the_expected_rgb(recipe):
  home, expected, _ = recipe
  config = config_from(os.path.join(home, "args_mmjax.train.txt"), home)
  checked = 0
  for key in ("labels", "captions"):
    s = config.data.sources[key]
    for split in ("train", "validation"):
      opened = sources.open_source(s.name, split, s.data_dir or config.data_dir,
                                   label_key=s.label_key if key == "labels" else "")
      src = sources.CleanSource(opened, key=key, source_index=0, kind=s.kind,
                                image_key="image", label_key=s.label_key, text_key=s.text_key)
      for i in range(len(src)):
        record = src[i]
        assert record["skipped"] == 0
        name = opened.data_source[i]["file_name"]
        name = name.decode() if isinstance(name, bytes) else name
        np.testing.assert_array_equal(record["image"], expected[name], err_msg=name)
        checked += 1
  assert checked == len(expected)  # every good file, no bad one


def test_the_first_training_batch_holds_the_expected_pixels(recipe):
  """The trainer's own first batch: every image is the centre crop of one expected RGB."""
  home, expected, _ = recipe
  config = config_from(os.path.join(home, "args_mmjax.train.txt"), home)
  size = config.data.image_size
  references = np.stack([transforms.center_crop_resize(rgb, size) for rgb in expected.values()])
  it = pipeline.make_train_iterator(config, tokenizer_lib.get_tokenizer(config), start_step=0,
                                    process_index=0, process_count=1)
  try:
    batch = next(it)
  finally:
    it.close()
  for image in batch["image"]:
    assert image.dtype == np.uint8
    distance = np.abs(references.astype(np.int16) - image[None]).reshape(len(references),
                                                                       -1).max(1)
    assert distance.min() == 0.0
