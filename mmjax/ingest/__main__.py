"""`python -m mmjax.ingest`: import local images, caption files or WebDataset shards as a
TFDS dataset (mmjax.ingest.cli; `--help` lists the flags)."""
from mmjax.ingest import cli

if __name__ == "__main__":
  cli.run("mmjax.ingest")
