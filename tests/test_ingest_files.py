"""mmjax.data.build: a user's folders and caption files, their mistakes, the splits."""
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers
import image_files
from mmjax import errors
from mmjax.data import sources
from mmjax.ingest import files as build

ZOO = image_files.image_zoo()


def write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


@pytest.fixture
def pets(tmp_path):
  """pets/<cat|dog|fish>/ with every image mode, bad files, a nested folder, an empty class,
  a text file and a loose file; returns (root, file_name -> expected RGB)."""
  root, expected = str(tmp_path / "pets"), {}
  for i, case in enumerate(ZOO):
    name = f"{('cat', 'dog', 'fish')[i % 3]}/{'2019/' if i % 5 == 0 else ''}{case.name}"
    write(os.path.join(root, name), case.data)
    expected[name] = case.expected
  for name, data in image_files.bad_files().items():
    write(os.path.join(root, "cat", name), data)
  os.makedirs(os.path.join(root, "empty_class"))
  write(os.path.join(root, "dog", "notes.txt"), "not an image")
  write(os.path.join(root, "dog", ".DS_Store"), b"\0")
  write(os.path.join(root, "labels.csv"), "loose file")
  return root, expected


def read_back(name, data_dir, split, label_key=""):
  opened = sources.open_source(name, split, data_dir, label_key=label_key)
  kind = "label" if label_key else "caption"
  src = sources.CleanSource(opened, key="s", source_index=0, kind=kind, image_key="image",
                            label_key=label_key, text_key="" if label_key else "captions")
  out = {}
  for i in range(len(src)):
    record, raw = src[i], opened.data_source[i]
    assert record["skipped"] == 0
    out[raw["file_name"].decode()] = record
  return opened, out


def test_label_folder_of_every_mode(pets, tmp_path):
  root, expected = pets
  data_dir = str(tmp_path / "datasets")
  report = build.build_from_images_dir(root, "my_pets", data_dir, val_fraction=0.25)
  assert report.class_names == ["cat", "dog", "fish"]
  assert sorted(w for w, _ in report.skipped) == sorted(
      f"cat/{n}" for n in image_files.bad_files())
  warnings = " ".join(report.warnings)
  assert "'empty_class' holds no images" in warnings and "dog/notes.txt" in warnings
  assert "labels.csv" in warnings and ".DS_Store" not in warnings
  assert sum(report.splits.values()) == len(expected)
  seen = {}
  for split in ("train", "validation"):
    opened, records = read_back("my_pets", data_dir, split, label_key="label")
    assert opened.class_names == ["cat", "dog", "fish"]
    for name, record in records.items():
      np.testing.assert_array_equal(record["image"], expected[name], err_msg=name)
      assert record["texts"] == [name.split("/")[0]]
      seen[name] = split
  assert sorted(seen) == sorted(expected)
  validation = sorted(n for n, s in seen.items() if s == "validation")
  per_class = {c: sum(n.startswith(c) for n in expected) for c in ("cat", "dog", "fish")}
  for cls, n in per_class.items():
    assert sum(v.startswith(cls) for v in validation) == round(0.25 * n)
  # Deterministic: a second build puts the same files in validation.
  build.build_from_images_dir(root, "my_pets_again", data_dir, val_fraction=0.25)
  _, again = read_back("my_pets_again", data_dir, "validation", label_key="label")
  assert sorted(again) == validation
  summary = report.summary()
  assert f"--config.data_dir={data_dir} --config.data.sources.labels.name=my_pets" in summary
  assert ("--config.evals.seen_classes.dataset=my_pets --config.evals.seen_classes.split="
          "validation --config.evals.zeroshot.num_examples=0") in summary


def test_caption_csv_from_excel(tmp_path):
  """UTF-8 with BOM, CRLF, quoted commas, rows of one image merged, a blank caption, a
  missing image, relative paths."""
  folder = tmp_path / "caps"
  for case in ZOO[:4]:
    write(str(folder / "img" / case.name), case.data)
  rows = ["image,caption", f'img/{ZOO[0].name},"a cat, sitting"', f"img/{ZOO[0].name},a cat",
          f"img/{ZOO[1].name},", f"img/{ZOO[2].name},café crème", "", "img/missing.png,gone",
          f"img/{ZOO[3].name},  padded  "]
  write(str(folder / "pairs.csv"), ("\r\n".join(rows) + "\r\n").encode("utf-8-sig"))
  data_dir = str(tmp_path / "datasets")
  report = build.build_from_captions_file(str(folder / "pairs.csv"), "my_pairs", data_dir)
  assert report.splits == {"train": 3}
  assert sorted(report.skipped) == [
      (f"pairs.csv line 4 (img/{ZOO[1].name})", "no non-blank 'caption'"),
      ("pairs.csv line 7 (img/missing.png)", "cannot read (No such file or directory)")]
  _, records = read_back("my_pairs", data_dir, "train")
  assert {n: r["texts"] for n, r in records.items()} == {
      f"img/{ZOO[0].name}": ["a cat, sitting", "a cat"],
      f"img/{ZOO[2].name}": ["café crème"], f"img/{ZOO[3].name}": ["padded"]}
  for case in (ZOO[0], ZOO[2], ZOO[3]):
    np.testing.assert_array_equal(records[f"img/{case.name}"]["image"], case.expected)


def test_jsonl_with_blank_lines_and_caption_lists(tmp_path):
  write(str(tmp_path / "a.png"), ZOO[0].data)
  lines = [json.dumps({"image": "a.png", "caption": ["one", "two"]}), "",
           json.dumps({"image": str(tmp_path / "a.png"), "caption": "three"}), "   "]
  write(str(tmp_path / "pairs.jsonl"), "\n".join(lines) + "\n")
  build.build_from_captions_file(str(tmp_path / "pairs.jsonl"), "j", str(tmp_path / "d"))
  _, records = read_back("j", str(tmp_path / "d"), "train")
  assert records["a.png"]["texts"] == ["one", "two", "three"]


def test_semicolon_separated_csv_and_other_column_names(tmp_path):
  write(str(tmp_path / "a.png"), ZOO[0].data)
  write(str(tmp_path / "pairs.csv"), "path;text\na.png;a photo; with a semicolon\n")
  with pytest.raises(errors.UsageError, match="line 2: 3 fields, the header has 2"):
    build.build_from_captions_file(str(tmp_path / "pairs.csv"), "x", str(tmp_path / "d"),
                                   image_column="path", caption_column="text")
  write(str(tmp_path / "pairs.csv"), 'path;text\na.png;"a photo; quoted"\n')
  build.build_from_captions_file(str(tmp_path / "pairs.csv"), "x", str(tmp_path / "d"),
                                 image_column="path", caption_column="text")
  _, records = read_back("x", str(tmp_path / "d"), "train")
  assert records["a.png"]["texts"] == ["a photo; quoted"]


@pytest.mark.parametrize("name, text, message", [
    ("pairs.csv", "image,text\na.png,x\n",
     r"pairs.csv: no column 'caption' \(--caption_column\) in the header; its columns are "
     r"'image', 'text'"),
    ("pairs.csv", "a.png,a caption\n", r"no column 'image' .* its columns are 'a caption', "
     r"'a.png' \(the first line must name the columns"),
    ("pairs.csv", "image,caption\na.png,x\nb.png,y,z\n",
     r"pairs.csv line 3: 3 fields, the header has 2 \(a caption holding ',' must be in double"),
    ("pairs.csv", 'image,caption\na.png,"unterminated\n', r"pairs.csv line \d+: .*"),
    ("pairs.jsonl", '{"image": "a.png", "caption": "x"}\n\n{"image": "b.png" "caption": 1}\n',
     r"pairs.jsonl line 3: not valid JSON \(Expecting ',' delimiter at column 19\)"),
    ("pairs.jsonl", '{"image": "a.png", "text": "x"}\n',
     r"pairs.jsonl line 1: no 'caption' field \(--caption_column\); it has 'image', 'text'"),
    ("pairs.jsonl", '{"image": "a.png", "caption": 3}\n',
     r"line 1: 'caption' must be a string or a list of strings, got 3"),
    ("pairs.jsonl", '["a.png", "x"]\n', r"line 1: expected a JSON object, got list"),
    ("pairs.txt", "a.png x\n", r"expected a .csv, .tsv or .jsonl file"),
])
def test_malformed_caption_files_name_file_and_line(tmp_path, name, text, message):
  write(str(tmp_path / name), text)
  with pytest.raises(errors.UsageError, match=message):
    build.build_from_captions_file(str(tmp_path / name), "x", str(tmp_path / "d"))
  assert not (tmp_path / "d").exists()  # nothing written


def test_non_utf8_csv_names_the_line(tmp_path):
  write(str(tmp_path / "pairs.csv"), "image,caption\na.png,ok\nb.png,caf\xe9\n".encode("latin-1"))
  with pytest.raises(errors.UsageError, match=r"pairs.csv line 3: not UTF-8 text \(byte 0xe9\)"):
    build.build_from_captions_file(str(tmp_path / "pairs.csv"), "x", str(tmp_path / "d"))


@pytest.mark.parametrize("name, message", [
    ("My-Pets", "use --name my_pets"), ("2024 photos", "use --name data_2024_photos"),
    ("", "use --name data"), ("mnist", "is a TFDS catalog dataset"),
    ("shapes", "is a TFDS catalog dataset")])
def test_bad_names_are_refused_before_building(pets, tmp_path, name, message):
  with pytest.raises(errors.UsageError, match=message):
    build.build_from_images_dir(pets[0], name, str(tmp_path / "d"))
  assert not (tmp_path / "d").exists()


def test_existing_dataset_and_strict_mode(pets, tmp_path):
  data_dir = str(tmp_path / "d")
  with pytest.raises(errors.UsageError, match=r"4 records cannot be used \(--strict\): cat/"):
    build.build_from_images_dir(pets[0], "my_pets", data_dir, strict=True)
  build.build_from_images_dir(pets[0], "my_pets", data_dir)
  with pytest.raises(errors.UsageError, match="already exists"):
    build.build_from_images_dir(pets[0], "my_pets", data_dir)
  with pytest.raises(errors.UsageError, match=r"--val_fraction 1.0: must be in \[0, 1\)"):
    build.build_from_images_dir(pets[0], "other", data_dir, val_fraction=1.0)


def test_write_dataset_keeps_bytes_as_given(tmp_path):
  """The low-level writer stores undecodable bytes too (read-time skipping is tested in
  test_data); `file_name` is a plain Text feature."""
  build.write_dataset("raw", str(tmp_path), {
      "image": tfds.features.Image(shape=(None, None, 3)), "file_name": tfds.features.Text()},
      {"train": [{"image": b"not an image", "file_name": "x.jpg"}]})
  raw = tfds.data_source("raw", split="train", data_dir=str(tmp_path),
                         decoders={"image": tfds.decode.SkipDecoding()})[0]
  assert raw == {"image": b"not an image", "file_name": b"x.jpg"}


def test_cli_prints_the_summary_and_one_line_errors(pets, tmp_path):
  data_dir = str(tmp_path / "d")
  command = [sys.executable, "-m", "mmjax.data.build", f"--images_dir={pets[0]}",
             f"--data_dir={data_dir}"]
  ok = helpers.call(command + ["--name=my_pets", "--val_fraction=0.2"], timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert ok.stdout.startswith(f"Built label dataset 'my_pets' in {data_dir}/my_pets/1.0.0\n")
  assert "  skipped: 4\n" in ok.stdout and "Evaluate on its validation split:" in ok.stdout
  assert ok.stderr == ""
  bad = helpers.call(command + ["--name=My-Pets"], timeout=300)
  assert bad.returncode == 2 and bad.stdout == ""
  assert bad.stderr.splitlines() == [
      "mmjax.data.build: error: --name 'My-Pets': TFDS dataset names are lowercase snake_case "
      "(a-z, 0-9, _; starting with a letter): use --name my_pets"]
