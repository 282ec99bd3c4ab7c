"""SigLIP's SentencePiece tokenizer behind mmjax's tokenizer interface
(`data.tokenizer.kind="siglip"`, `data.tokenizer.path` = the checkpoint folder's
spiece.model).

Texts are canonicalised as big_vision and transformers' SiglipTokenizer do (lower case,
ASCII punctuation removed, whitespace collapsed), encoded with the model's own ids, ended
with EOS (`</s>`) and padded with EOS to the fixed length SigLIP was trained on (its text
tower reads every slot and pools the last). No BOS. tests/test_pretrained.py checks the ids
against transformers' tokenizer.
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from mmjax import errors

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
  """Lower case, no ASCII punctuation, single spaces, stripped."""
  return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


class SiglipTokenizer:
  """A SigLIP SentencePiece model: EOS ends and pads every row, no BOS."""

  bos_id = None

  def __init__(self, model_proto: bytes, *, origin: str = "<bytes>"):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.eos_id = self._sp.piece_to_id("</s>")
    if self._sp.id_to_piece(self.eos_id) != "</s>":
      raise errors.UsageError(f"SentencePiece model {origin} has no </s> piece: not a SigLIP "
                              "tokenizer (set data.tokenizer.path to the checkpoint "
                              "folder's spiece.model)")
    self.pad_id = self.eos_id  # transformers' SiglipTokenizer: pad_token = "</s>"

  def __getstate__(self) -> dict:
    return {"model_proto": self.model_proto}  # Grain workers rebuild it from bytes

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model_proto"])

  @classmethod
  def from_file(cls, path: str) -> "SiglipTokenizer":
    if not path:
      raise errors.UsageError("config data.tokenizer.kind='siglip' needs data.tokenizer.path: "
                              "the checkpoint folder's spiece.model")
    if not epath.Path(path).exists():
      raise errors.UsageError(f"config data.tokenizer.path={path!r}: no such file (a SigLIP "
                              "checkpoint folder's spiece.model)")
    return cls(epath.Path(path).read_bytes(), origin=str(path))

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """texts -> int32 [len(texts), max_len]: [pieces..., EOS, EOS...]; a long text keeps its
    first max_len - 1 pieces and still ends with EOS."""
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of strings, not a single str")
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for i, ids in enumerate(self._sp.encode([canonicalize(t) for t in texts])):
      ids = ids[:max_len - 1]
      out[i, :len(ids)] = ids
      out[i, len(ids)] = self.eos_id
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """One id sequence [L] -> text, stopping at the first EOS."""
    kept = []
    for t in np.asarray(ids).reshape(-1).tolist():
      if t == self.eos_id:
        break
      kept.append(int(t))
    return self._sp.decode(kept)
