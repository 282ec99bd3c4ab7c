"""`python -m mmjax.data.build`: the dataset importer's earlier name, kept for existing
commands and scripts; the importer is `mmjax.ingest` (`python -m mmjax.ingest --help`)."""
from mmjax.ingest import cli

if __name__ == "__main__":
  cli.run("mmjax.data.build")
