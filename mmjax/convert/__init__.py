"""Converters from other frameworks' checkpoints to mmjax checkpoints (see `openclip`)."""
