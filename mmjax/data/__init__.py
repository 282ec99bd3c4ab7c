"""Data: TFDS sources read TF-free, the Grain pipeline (importing datasets: mmjax.ingest).

`decode_image(encoded) -> uint8 [H, W, 3]` is the one image decoder of every read path
(see mmjax.data.images).
"""
from mmjax.data.images import decode_image

__all__ = ["decode_image"]
