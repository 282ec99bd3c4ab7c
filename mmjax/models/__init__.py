"""Model zoo: `build_model(config)` picks the model named by `config.model.name`."""
import flax.linen as nn
import ml_collections


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  name = config.model.name
  if name == "coca":
    from mmjax.models import coca
    return coca.CoCa(coca.CoCaConfig.from_config(config))
  if name == "flava":
    from mmjax.models import flava
    return flava.Flava(flava.FlavaConfig.from_config(config))
  raise ValueError(f"config model.name={name!r}: choose 'coca' or 'flava'")
