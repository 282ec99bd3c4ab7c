"""python -m mmjax.convert --from openclip|hf --checkpoint PATH --out DIR [--config SPEC]
(mmjax.convert.importer)."""
from mmjax import errors
from mmjax.convert import importer

if __name__ == "__main__":
  importer.define_flags()
  errors.run(importer.main, "mmjax.convert")
