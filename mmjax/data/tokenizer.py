"""The tokenizer of a config: loaded from `data.tokenizer`, or trained on the dataset texts.

Training reads every text the train pipeline can emit (`mmjax.data.sources.train_texts`)
and is cached under `<data_dir>/tokenizers/`, keyed by a hash of the texts and settings.
Checkpoints carry the tokenizer among their assets (`checkpoint_assets`), so a checkpoint
is read with the tokenizer it was trained with, without the data it was trained on.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os

import ml_collections
from etils import epath

from mmjax import errors, locks
from mmjax.data import sources
from mmjax.tokenizers import openclip, sentencepiece, siglip

Tokenizer = sentencepiece.Tokenizer | openclip.OpenClipTokenizer | siglip.SiglipTokenizer

# Checkpoint asset names (mmjax.checkpoint.Checkpointer.save's `assets`).
SENTENCEPIECE_ASSET = "tokenizer.model"
OPENCLIP_ASSET = "tokenizer_" + openclip.VOCAB_FILE
SIGLIP_ASSET = "tokenizer_siglip_spiece.model"  # SigLIP's ids, not mmjax's: its own name


def checkpoint_assets(tokenizer: Tokenizer) -> dict[str, bytes]:
  """{asset name: bytes} that rebuild `tokenizer` (`get_tokenizer(config, assets)`)."""
  if isinstance(tokenizer, openclip.OpenClipTokenizer):
    return {OPENCLIP_ASSET: tokenizer.vocab_bytes}
  if isinstance(tokenizer, siglip.SiglipTokenizer):
    return {SIGLIP_ASSET: tokenizer.model_proto}
  return {SENTENCEPIECE_ASSET: tokenizer.model_proto}


def get_tokenizer(config: ml_collections.ConfigDict,
                  assets: dict[str, bytes] | None = None) -> Tokenizer:
  """The tokenizer for `config`.

  `assets` (a checkpoint's, `mmjax.checkpoint.Checkpointer.restore_assets`) holding a
  tokenizer: that one, the one the checkpoint's model was trained with, whatever
  `data.tokenizer` says. Otherwise:

  `config.data.tokenizer.kind == "openclip"`: open_clip's CLIP BPE (merges from `path`, or
  from the installed open_clip package when empty).
  `config.data.tokenizer.path` set: load that SentencePiece model (its ids must be ours).
  Otherwise train one (vocab `config.data.tokenizer.vocab_size`) on every text of the
  configured train sources (label-template prompts and captions), cached as
  `<data_dir>/tokenizers/<sha of texts + settings>.model` and built under a file lock so
  concurrent processes train it once.
  """
  assets = assets or {}
  if SENTENCEPIECE_ASSET in assets:
    return sentencepiece.Tokenizer(assets[SENTENCEPIECE_ASSET], origin="<checkpoint>")
  if OPENCLIP_ASSET in assets:
    return openclip.OpenClipTokenizer(vocab_bytes=assets[OPENCLIP_ASSET])
  if SIGLIP_ASSET in assets:
    return siglip.SiglipTokenizer(assets[SIGLIP_ASSET], origin="<checkpoint>")
  if config.data.tokenizer.kind == "openclip":
    # open_clip's BPE (ids pad 0, BOS 49406, EOS 49407), for converted open_clip models.
    return openclip.OpenClipTokenizer(os.path.expanduser(config.data.tokenizer.path) or None)
  if config.data.tokenizer.kind == "siglip":
    # SigLIP's SentencePiece (EOS-padded, no BOS), from the checkpoint folder.
    return siglip.SiglipTokenizer.from_file(os.path.expanduser(config.data.tokenizer.path))
  path = config.data.tokenizer.path
  if path:
    path = os.path.expanduser(path)
    if not epath.Path(path).exists():
      raise errors.UsageError(f"config data.tokenizer.path={config.data.tokenizer.path!r}: "
                              f"no such file {path}")
    try:
      return sentencepiece.Tokenizer.from_file(path)
    except RuntimeError as e:  # sentencepiece: not a serialized model
      raise errors.UsageError(f"config data.tokenizer.path={config.data.tokenizer.path!r}: "
                              f"not a SentencePiece model ({errors.one_line(str(e))[:120]})"
                              ) from None
  texts = sources.train_texts(config)
  vocab_size = int(config.data.tokenizer.vocab_size)
  recipe = {"v": 2, "model_type": "bpe", "vocab_size": vocab_size, "texts": texts}
  h = hashlib.sha256(json.dumps(recipe).encode())
  cache_dir = os.path.join(os.path.expanduser(config.data_dir), "tokenizers")
  cache = os.path.join(cache_dir, h.hexdigest()[:16] + ".model")
  if not os.path.exists(cache):
    try:
      with locks.file_lock(cache + ".lock"):
        if not os.path.exists(cache):
          tok = sentencepiece.train_tokenizer(texts, vocab_size)
          tmp = cache + f".tmp{os.getpid()}"
          with open(tmp, "wb") as f:
            f.write(tok.model_proto)
          os.replace(tmp, cache)  # atomic: readers never see a partial model
          return tok
    except PermissionError as e:
      raise _read_only(config, cache_dir, e) from None
    except OSError as e:
      if e.errno != errno.EROFS:
        raise
      raise _read_only(config, cache_dir, e) from None
  return sentencepiece.Tokenizer.from_file(cache)


def _read_only(config: ml_collections.ConfigDict, cache_dir: str,
               error: OSError) -> errors.UsageError:
  return errors.UsageError(
      f"cannot cache the trained tokenizer in {cache_dir} ({error.strerror}; config "
      f"data_dir={config.data_dir} is read-only): set data.tokenizer.path to a SentencePiece "
      "model (e.g. one trained by a run whose data_dir was writable, from its "
      "<data_dir>/tokenizers/), or point data_dir at a writable folder")
