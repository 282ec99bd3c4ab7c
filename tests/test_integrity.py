"""Sealed checkpoints: a cut file (truncated or missing) is found and the step set aside;
end to end in tests/test_resume.py (the restore falls back and resumes exactly)."""
import os

from etils import epath

from mmjax import integrity


def make_step(root, step, files):
  for name, data in files.items():
    path = root / str(step) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  return epath.Path(root / str(step))


def test_seal_then_a_truncated_or_missing_file_is_named(tmp_path):
  step = make_step(tmp_path, 5, {"state/d/abc": b"x" * 100, "config/c.json": b"{}"})
  assert integrity.problem(step) is None  # unsealed: trusted
  integrity.seal(step)
  assert integrity.problem(step) is None
  os.truncate(step / "state/d/abc", 60)
  assert integrity.problem(step) == "state/d/abc: 60 bytes, 100 when committed"
  os.remove(step / "config/c.json")
  assert integrity.problem(step) == "config/c.json: missing"


def test_set_aside_moves_the_newest_bad_steps_and_names_the_one_restored(tmp_path, capsys):
  root = tmp_path / "checkpoints"
  for step in (5, 10, 15):
    integrity.seal(make_step(root, step, {"state/a": b"x" * step}))
  os.remove(root / "15" / "state" / "a")
  os.truncate(root / "10" / "state" / "a", 1)
  assert integrity.set_aside_incomplete(str(root), [10, 15, 5]) == [15, 10]
  assert sorted(os.listdir(root)) == ["5"]
  assert len(os.listdir(tmp_path / integrity.ASIDE)) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 2 and "step 15" in lines[0] and "state/a: missing" in lines[0]
  assert "restoring step 5 instead" in lines[1]


def test_works_on_an_object_store(gcs):
  step = epath.Path("gs://bucket/run/checkpoints/5")
  (step / "state").mkdir(parents=True, exist_ok=True)
  (step / "state" / "a").write_bytes(b"x" * 10)
  integrity.seal(step)
  assert integrity.problem(step) is None
  (step / "state" / "a").write_bytes(b"x" * 3)
  assert integrity.problem(step) == "state/a: 3 bytes, 10 when committed"
