"""mmjax.state: the train state created abstractly, then directly sharded."""
import helpers
from configs import coca


def test_adafactor_state_is_sharded_like_its_parameters():
  """Adafactor's factored statistics have one axis fewer than their parameter: they take
  the parameter's axis names minus that axis. configs/coca.py:tiny (width 128, so optax
  factors its matrices) created directly onto an fsdp x tensor mesh (its Adafactor train
  step runs in tests/test_benchmarks.py)."""
  config = helpers.override(coca.get_config("tiny"), **{"mesh.shape": (1, 4, 2),
                                                        "batch_size": 8})
  rt, state = helpers.step_setup(config, 8)
  shardings = rt.shardings
  get = lambda tree: tree["vision"]["encoder"]["layers"]["mlp"]["fc1"]["dense"]["kernel"]
  # chain(gradient clipping, adafactor chain(factored RMS, ...), logit-scale projection)
  factored, factored_shardings = state.opt_state[1][0], shardings.opt_state[1][0]
  layers, embed, mlp = get(state.params).shape  # [layers, embed, mlp]
  assert get(factored.v_row).shape == (layers, embed)  # the mlp axis is factored out
  assert get(factored.v_col).shape == (layers, mlp)
  param_spec = tuple(get(shardings.params).spec)
  assert param_spec[1:] == ("fsdp", "tensor")
  assert tuple(get(factored_shardings.v_row).spec) == param_spec[:2]
  assert tuple(get(factored_shardings.v_col).spec) == (param_spec[0], param_spec[2])
