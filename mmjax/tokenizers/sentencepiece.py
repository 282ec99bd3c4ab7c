"""SentencePiece tokenizer with mmjax's fixed special ids (`mmjax.vocabulary`), and training
one in memory.

A loaded model with other special ids is rejected rather than silently remapped: the model
code (padding masks, captioning targets) relies on them.
"""
from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from mmjax import errors
from mmjax.vocabulary import BOS_ID, EOS_ID, PAD_ID, UNK_ID



class Tokenizer:
  """Wraps a SentencePiece model whose pad/eos/bos/unk ids are 0/1/2/3."""

  pad_id: int = PAD_ID
  eos_id: int = EOS_ID
  bos_id: int = BOS_ID
  unk_id: int = UNK_ID

  def __init__(self, model_proto: bytes, *, origin: str = "<bytes>"):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id())
    if got != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
      raise ValueError(
          f"SentencePiece model {origin} has pad/eos/bos/unk ids {got}; mmjax needs "
          f"{(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}. Retrain it with --pad_id=0 --eos_id=1 "
          "--bos_id=2 --unk_id=3, or set data.tokenizer.path='' to train one on the data.")

  def __getstate__(self) -> dict:
    # SentencePieceProcessor does not pickle; Grain worker processes rebuild it from bytes.
    return {"model_proto": self.model_proto}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model_proto"])

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    """A local path or a gs:// URI (etils.epath; gs:// needs the `gcs` extra)."""
    return cls(epath.Path(path).read_bytes(), origin=str(path))

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Tokenises `texts` to int32 [len(texts), max_len]: [BOS, pieces..., EOS, PAD...].

    Texts longer than `max_len` lose their trailing pieces; EOS is always kept last so a
    truncated caption still ends like a real one.
    """
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 to hold BOS and EOS, got {max_len}")
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of strings, not a single str")
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, pieces in enumerate(self._sp.encode(list(texts))):
      pieces = pieces[:max_len - 2]
      out[i, 0] = BOS_ID
      out[i, 1:1 + len(pieces)] = pieces
      out[i, 1 + len(pieces)] = EOS_ID
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes one id sequence [L], stopping at EOS and skipping PAD and BOS."""
    kept = []
    for t in np.asarray(ids).reshape(-1).tolist():
      if t == EOS_ID:
        break
      if t not in (PAD_ID, BOS_ID):
        kept.append(int(t))
    return self._sp.decode(kept)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
  """Trains a BPE SentencePiece model on `texts` (in memory)."""
  if not texts:
    raise ValueError("cannot train a tokenizer on an empty text list")
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0,
        # BPE reaches the requested size on tiny corpora by merging whole words (unigram
        # stops far short); hard_vocab_limit=False still accepts a smaller vocab if merges
        # run out.
        hard_vocab_limit=False,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        num_threads=2, minloglevel=2)
  except RuntimeError as e:
    # "Vocabulary size is smaller than required_chars. 64 vs 99.": every distinct character
    # of the texts (character_coverage=1) plus the special pieces needs an id.
    needed = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
    if needed is None:
      raise
    raise errors.UsageError(
        f"the training texts use {int(needed.group(1)) - 4} distinct characters, so the "
        f"tokenizer needs at least {needed.group(1)} ids with its 4 special ones, but config "
        f"data.tokenizer.vocab_size={vocab_size}: raise data.tokenizer.vocab_size (and "
        "model.text.vocab_size where it does not follow it), or set data.tokenizer.path to "
        "a SentencePiece model") from None
  return Tokenizer(buf.getvalue(), origin="<trained>")
