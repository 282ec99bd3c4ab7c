"""mmjax.data.preview: the batch grid and mixing statistics of a config."""
import sys


import helpers
from conftest import REPO


def test_preview_json_reports_mix_fractions_close_to_weights(tmp_path, data_dir):
  import json
  out = helpers.call(
      [sys.executable, "-m", "mmjax.data.preview", "--config", f"{REPO}/configs/shapes.py",
       "--out", str(tmp_path / "batch.png"), "--num_batches", "8", "--json",
       f"--config.data_dir={data_dir}", "--config.data.sources.labels.weight=0.3",
       "--config.data.sources.captions.weight=0.7"], timeout=300, check=True)
  stats = json.loads(out.stdout.strip().splitlines()[-1])
  assert stats["weights_per_source"] == {"labels": 0.3, "captions": 0.7}
  for name, weight in stats["weights_per_source"].items():
    assert abs(stats["fraction_per_source"][name] - weight) <= 0.05
  assert (tmp_path / "batch.png").exists()
