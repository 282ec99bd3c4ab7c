"""Weights in (`python -m mmjax.convert`, `importer`): open_clip CLIP / CoCa state dicts and
Hugging Face CLIP / SigLIP folders -> mmjax checkpoints. The name mappings (`mapping`,
`two_tower`, `openclip`) also serve `mmjax.export`, the way out."""
