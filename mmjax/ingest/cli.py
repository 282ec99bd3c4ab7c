"""The importer's command line: local folders and caption files (mmjax.ingest.files) or
WebDataset shards with Apache Beam (mmjax.ingest.beam, the `beam` extra).

  python -m mmjax.ingest --images_dir DIR --name my_labels --data_dir ~/datasets
  python -m mmjax.ingest --captions_file caps.csv --name my_captions --data_dir ~/datasets
  python -m mmjax.ingest --webdataset 'shards/{00000..00099}.tar' --name my_web \
      --data_dir ~/datasets [--runner DataflowRunner -- BEAM_ARGS...]

`python -m mmjax.data.build` runs the same command. Mistakes (a bad --name, a missing
column, a malformed row, an existing dataset) are one line naming the file, line and fix,
exit status 2.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging

from mmjax import command, errors
from mmjax.ingest import files, options as options_lib, report as report_lib, webdataset

try:  # the `beam` extra
  from mmjax.ingest import beam
except ImportError:
  beam = None


def run(name: str) -> None:
  """Runs the importer as the command `name` (mmjax.ingest, or its old name
  mmjax.data.build): no --config (it reads files, not a training config); TFDS's INFO and
  WARNING lines would bury the summary."""
  define_flags()
  command.run(main, name, config=False, log_level=absl_logging.ERROR)


def define_flags() -> None:
  flags.DEFINE_string("images_dir", "", "Folder of class sub-folders of images.")
  flags.DEFINE_string("captions_file", "", ".csv/.tsv/.jsonl of (image, caption) rows.")
  flags.DEFINE_string("name", "", "TFDS dataset name to write (lowercase snake_case).")
  flags.DEFINE_string("data_dir", "~/.cache/mmjax/datasets", "TFDS data_dir.")
  flags.DEFINE_float("val_fraction", 0.0, "Fraction of each class (or of the captioned "
                     "images) written to a 'validation' split, deterministically.")
  flags.DEFINE_string("image_column", "image", "Captions file: the image path column/field.")
  flags.DEFINE_string("caption_column", "caption", "Captions file: the caption column/field.")
  flags.DEFINE_bool("strict", False, "Fail on images that cannot be read or decoded (and "
                    "caption rows without a caption) instead of leaving them out.")
  if beam is None:
    flags.DEFINE_string("webdataset", "", "WebDataset shards; needs pip install -e '.[beam]'.")
  else:
    _define_webdataset_flags()


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  inputs = {"--images_dir": f.images_dir, "--captions_file": f.captions_file,
            "--webdataset": f.webdataset}
  if sum(bool(v) for v in inputs.values()) != 1 or not f.name:
    raise errors.UsageError(f"give --name and exactly one of {' / '.join(inputs)}")
  if f.webdataset:
    if beam is None:
      raise errors.UsageError("--webdataset needs Apache Beam: pip install -e '.[beam]'")
    return webdataset_main(argv)
  if f.images_dir:
    built = files.build_from_images_dir(f.images_dir, f.name, f.data_dir,
                                        val_fraction=f.val_fraction, strict=f.strict)
  else:
    built = files.build_from_captions_file(f.captions_file, f.name, f.data_dir,
                                           image_column=f.image_column,
                                           caption_column=f.caption_column,
                                           val_fraction=f.val_fraction, strict=f.strict)
  print(built.summary())


# --- WebDataset shards -----------------------------------------------------------------
def _define_webdataset_flags() -> None:
  flags.DEFINE_string("webdataset", "", "WebDataset shard pattern: braces "
                      "('shards/{00000..00099}.tar') and globs, local or gs://.")
  flags.DEFINE_string("runner", "DirectRunner", "Beam runner: DirectRunner (all local cores), "
                      "DataflowRunner, FlinkRunner, SparkRunner... Beam options go after `--`.")
  flags.DEFINE_string("label", "", "Label dataset: 'cls' (the .cls member) or 'json:FIELD'. "
                      "Empty: caption dataset (.txt, else the .json's caption).")
  flags.DEFINE_string("class_names", "", "Label datasets: file of class names, one per line "
                      "(line i = class id i). Empty: the sorted classes seen in the shards.")
  flags.DEFINE_bool("verify_images", True, "Decode every image (exact undecodable_image "
                    "count). False: header only (3.5x less CPU on 384 px JPEGs).")
  flags.DEFINE_integer("min_image_side", 0, "Drop images with a shorter side below this.")
  flags.DEFINE_float("max_aspect_ratio", 0.0, "Drop images with longer/shorter side above this.")
  flags.DEFINE_integer("min_caption_chars", 0, "Drop captions shorter than this (characters).")
  flags.DEFINE_integer("max_caption_chars", 0, "Drop captions longer than this (0 = no bound).")
  flags.DEFINE_bool("dedupe_images", False, "Keep one copy of byte-identical images (the "
                    "first in shard-name, tar order); reads the shards twice.")
  flags.DEFINE_bool("fail_on_skip", False, "Stop at the first skipped sample or bad shard.")
  flags.DEFINE_bool("dry_run", False, "Print the build and Beam options; read nothing.")


def options_from_flags() -> options_lib.BuildOptions:
  f = flags.FLAGS
  rules = webdataset.SampleRules(
      label=f.label, verify_images=f.verify_images, min_image_side=f.min_image_side,
      max_aspect_ratio=f.max_aspect_ratio, min_caption_chars=f.min_caption_chars,
      max_caption_chars=f.max_caption_chars)
  return options_lib.BuildOptions(pattern=f.webdataset, name=f.name, data_dir=f.data_dir,
                                 rules=rules,
                      class_names_file=f.class_names, dedupe_images=f.dedupe_images,
                      fail_on_skip=f.fail_on_skip)


def dry_run_text(options: options_lib.BuildOptions, runner: str,
                 beam_args: Sequence[str]) -> str:
  """The build as it would run: output, options, Beam arguments, the command line."""
  args = beam.default_beam_args(runner, beam_args)
  rules = dataclasses.asdict(options.rules)
  lines = [f"dataset:   {os.path.join(options.data_dir, options.name, options_lib.VERSION)} "
           f"({options.layout} layout, report {options_lib.REPORT_FILE} inside)",
           f"shards:    {options.pattern} ({len(webdataset.expand_braces(options.pattern))} "
           "after brace expansion; globs are listed when the build starts)",
           "rules:     " + " ".join(f"{k}={v}" for k, v in rules.items()),
           f"dedupe_images={options.dedupe_images} fail_on_skip={options.fail_on_skip} "
           f"class_names={options.class_names_file or '(classes seen)'}",
           "beam:      " + " ".join(args)]
  flag_args = [f"--webdataset='{options.pattern}'", f"--name={options.name}",
               f"--data_dir={options.data_dir}", f"--runner={runner}"]
  defaults = options_lib.BuildOptions(pattern="", name="", data_dir="")
  flag_args += [f"--{k}={v}" for k, v in rules.items()
                if v != getattr(defaults.rules, k)]
  flag_args += [f"--{k}" for k in ("dedupe_images", "fail_on_skip") if getattr(options, k)]
  if options.class_names_file:
    flag_args.append(f"--class_names={options.class_names_file}")
  lines.append("command:   python -m mmjax.data.build " + " ".join(flag_args)
               + (" -- " + " ".join(beam_args) if beam_args else ""))
  return "\n".join(lines)


def webdataset_main(argv: Sequence[str]) -> None:
  """`python -m mmjax.data.build --webdataset ...`; argv[1:] (after `--`) go to Beam."""
  f = flags.FLAGS
  beam_args = list(argv[1:])
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  # The DirectRunner relays its worker processes' start-up warnings, which they print too.
  logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
  options = options_from_flags()
  options.validate()
  if f.dry_run:
    print(dry_run_text(options, f.runner, beam_args))
    return
  start = time.time()
  report = beam.run_build(options, f.runner, beam_args)
  print(report_lib.summary_text(report, os.path.expanduser(options.data_dir))
        + f"\n  took {time.time() - start:.0f} s")
