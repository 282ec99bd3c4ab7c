"""Tokenizers: SentencePiece with mmjax's fixed ids (`sentencepiece`) and open_clip's CLIP BPE
(`openclip`, for converted open_clip models). Both encode to int32 [N, max_len] rows of
[BOS, pieces..., EOS, PAD...] and expose pad_id / bos_id / eos_id / vocab_size."""
