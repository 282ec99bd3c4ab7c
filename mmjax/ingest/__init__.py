"""Dataset import: your images and captions -> TFDS ArrayRecord datasets that training reads
by name (TF-free), with every image decoded once by `mmjax.data.decode_image`, the decoder
training uses.

  files.py      folders of class sub-folders and caption files (.csv/.tsv/.jsonl)
  webdataset.py reading WebDataset shards: samples, the rules that skip or filter them
  options.py    what a WebDataset build is (options, features, version, its error)
  beam.py       the Apache Beam pipeline over WebDataset shards (the `beam` extra)
  report.py     the skip report: counts by cause per shard and in total, the summary
  cli.py        the command: `python -m mmjax.ingest` (or `python -m mmjax.data.build`)
"""
