"""Ids the whole stack agrees on: special tokens of mmjax's own tokenizers and text types.

Model code (padding masks, captioning targets), the data pipeline and the objectives rely on
them; a SentencePiece model with other special ids is rejected rather than silently
remapped (see `mmjax.tokenizers.sentencepiece`). open_clip's BPE keeps PAD_ID but has its
own BOS/EOS, which travel with the tokenizer object.
"""
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
FIRST_REGULAR_ID = 4  # the first id that is an ordinary piece

# The kind of text of an example (prefix conditioning keeps one learned prefix per kind).
TEXT_TYPES = {"caption": 0, "label": 1}
CAPTION, LABEL = TEXT_TYPES["caption"], TEXT_TYPES["label"]
