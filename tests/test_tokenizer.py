"""Tokenizer: special ids, round trip, truncation, loading and config errors."""
import io
import sys

import numpy as np
import pytest
import sentencepiece as spm

from configs import schema
from mmjax import errors
from mmjax.data import tokenizer as tk
from mmjax.tokenizers import sentencepiece as sp_tok

TEXTS = [f"a {s} {c} {h}" for s in ("small", "large") for c in ("red", "blue", "green")
         for h in ("star", "circle", "square")] * 3


@pytest.fixture(scope="module")
def tok():
  return sp_tok.train_tokenizer(TEXTS, vocab_size=64)


def test_special_ids(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert 4 < tok.vocab_size <= 64


def test_round_trip_and_layout(tok):
  ids = tok.encode(["a small red star", "a large blue circle"], max_len=16)
  assert ids.dtype == np.int32 and ids.shape == (2, 16)
  assert (ids[:, 0] == tok.bos_id).all()
  for row, text in zip(ids, ["a small red star", "a large blue circle"]):
    eos = int(np.argmax(row == tok.eos_id))
    assert eos > 1 and (row[eos + 1:] == tok.pad_id).all() and (row[1:eos] > 3).all()
    assert tok.decode(row) == text


def test_truncation_keeps_eos(tok):
  ids = tok.encode(["a small red star and a large blue circle and a green square"], max_len=5)
  assert ids.shape == (1, 5) and ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
  assert (ids[0, 1:4] > 3).all()


def test_pickles(tok):
  import pickle
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again.encode(["a red star"], 8), tok.encode(["a red star"], 8))


def test_wrong_ids_rejected():
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=buf, vocab_size=40,
                                 hard_vocab_limit=False, minloglevel=2)  # default ids differ
  with pytest.raises(ValueError, match="pad/eos/bos/unk"):
    sp_tok.Tokenizer(buf.getvalue())


def test_missing_path_names_key(tmp_path):
  c = schema.base()
  c.data_dir = str(tmp_path)
  c.data.tokenizer.path = str(tmp_path / "nope.model")
  with pytest.raises(errors.UsageError, match="config data.tokenizer.path"):
    tk.get_tokenizer(c)


def test_no_tensorflow():
  assert "tensorflow" not in sys.modules
