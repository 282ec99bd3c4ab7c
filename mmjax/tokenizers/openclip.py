"""open_clip's CLIP BPE behind mmjax's tokenizer interface (`data.tokenizer.kind="openclip"`).

The merges file is read from the installed open_clip package, located without importing it
(so torch is never imported, e.g. in Grain workers); it is not copied into this repository.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from collections.abc import Sequence

import numpy as np

from mmjax import vocabulary

# The BPE and text cleaning follow open_clip's SimpleTokenizer (from OpenAI CLIP, MIT
# licence) with its default clean="lower"; tests/test_openclip.py checks the ids against it.
# Ids: pad 0, <start_of_text> 49406 (BOS), <end_of_text> 49407 (EOS); byte-level BPE never
# needs an unknown token (unk_id is None).

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # as open_clip: the merges that fit the 49408-id vocabulary


def default_vocab_path() -> str:
  """Path of the merges file inside the installed open_clip package."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "data.tokenizer.kind='openclip' reads the BPE vocabulary of the installed open_clip "
        "package: pip install open-clip-torch (see benchmarks/setup_openclip.sh), or set "
        "data.tokenizer.path to a copy of bpe_simple_vocab_16e6.txt.gz")
  path = os.path.join(list(spec.submodule_search_locations)[0], VOCAB_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"open_clip is installed but has no {path}")
  return path


@functools.lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
  """Reversible byte -> printable unicode map (GPT-2 / CLIP)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(2 ** 8):
    if b not in bs:
      bs.append(b)
      cs.append(2 ** 8 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _clean(text: str) -> str:
  """open_clip's clean="lower": ftfy fix, double html unescape, collapse whitespace, lower."""
  import ftfy  # a dependency of open_clip, so present wherever its vocabulary is
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).strip().lower()


class OpenClipTokenizer:
  """encode/decode with open_clip's ids.

  Same interface as `mmjax.tokenizers.sentencepiece.Tokenizer`.
  """

  pad_id: int = vocabulary.PAD_ID
  unk_id = None

  def __init__(self, vocab_path: str | None = None, *, vocab_bytes: bytes | None = None):
    """Merges from `vocab_bytes` (the gzipped file's bytes, e.g. a checkpoint's copy), or
    the file `vocab_path`, or the installed open_clip package's."""
    import regex  # \p{L} classes; a dependency of open_clip
    if vocab_bytes is None:
      with open(vocab_path or default_vocab_path(), "rb") as f:
        vocab_bytes = f.read()
    self.vocab_bytes = vocab_bytes
    merges = gzip.decompress(vocab_bytes).decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    special = ["<start_of_text>", "<end_of_text>"]
    vocab += special
    self.encoder = {t: i for i, t in enumerate(vocab)}
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.byte_encoder = _bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    self.bos_id, self.eos_id = self.encoder[special[0]], self.encoder[special[1]]
    self._cache = {t: t for t in special}
    self._pat = regex.compile("|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                              r"""[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def __getstate__(self) -> dict:
    # Grain workers rebuild from the merges rather than pickling the 49k-entry tables.
    return {"vocab_bytes": self.vocab_bytes}

  def __setstate__(self, state: dict) -> None:
    self.__init__(vocab_bytes=state["vocab_bytes"])

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def _bpe(self, token: str) -> list[str]:
    if token in self._cache:
      return self._cache[token].split(" ")
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = set(zip(word[:-1], word[1:]))
      bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if bigram not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    self._cache[token] = " ".join(word)
    return list(word)

  def encode_pieces(self, text: str) -> list[int]:
    """BPE ids of one text, without BOS/EOS."""
    ids = []
    for token in self._pat.findall(_clean(text)):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[piece] for piece in self._bpe(token))
    return ids

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len]: [BOS, pieces..., EOS, 0...]; too long: truncated with
    EOS kept last (as open_clip's tokenizer with context_length=max_len)."""
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 to hold BOS and EOS, got {max_len}")
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of strings, not a single str")
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      ids = [self.bos_id, *self.encode_pieces(text)[:max_len - 2], self.eos_id]
      out[i, :len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """One id sequence [L] -> text, stopping at EOS and skipping PAD and BOS."""
    kept = []
    for t in np.asarray(ids).reshape(-1).tolist():
      if t == self.eos_id:
        break
      if t not in (self.pad_id, self.bos_id):
        kept.append(self.decoder[int(t)])
    text = bytearray(self.byte_decoder[c] for c in "".join(kept)).decode("utf-8",
                                                                         errors="replace")
    return text.replace("</w>", " ").strip()


