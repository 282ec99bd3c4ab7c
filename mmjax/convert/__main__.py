"""python -m mmjax.convert --from openclip|hf --checkpoint PATH --out DIR [--config SPEC]
(mmjax.convert.importer)."""
from mmjax import command
from mmjax.convert import importer

if __name__ == "__main__":
  importer.define_flags()
  command.run(importer.main, "mmjax.convert", config_required=False,
              config_help=importer.CONFIG_HELP, required=("from", "checkpoint", "out"))
