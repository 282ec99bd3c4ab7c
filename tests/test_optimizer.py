"""Optimizers: the CoCa paper's Adafactor against a float64 NumPy implementation of its
update rule written here, and a logit scale that cannot freeze past its cap."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from configs import coca, flava
from mmjax import models, state as state_lib
from mmjax.optimizer import NO_DECAY_NAMES, make_optimizer

LR, WARMUP, TOTAL = 0.05, 2, 8
B1, B2, WD, EPS, UPDATE_CLIP = 0.9, 0.999, 0.1, 1e-30, 1.0
SHAPES = {  # factored when the two largest axes are both >= 128
    ("dense", "kernel"): (128, 160),  # factored, decayed
    ("dense", "bias"): (160,),  # 1-D: unfactored, not decayed
    ("stack", "kernel"): (2, 160, 128),  # scanned layers: factored over the last two axes
    ("small", "kernel"): (8, 4),  # 2-D but small: unfactored, decayed
    ("logit_scale",): (),  # not decayed; projected under log(100)
}


def adafactor_config(grad_clip_norm: float):
  return helpers.tiny_config(**{
      "optimizer.name": "adafactor", "optimizer.learning_rate": LR,
      "optimizer.warmup_steps": WARMUP, "total_steps": TOTAL, "optimizer.schedule": "linear",
      "optimizer.b1": B1, "optimizer.b2": B2, "optimizer.weight_decay": WD,
      "optimizer.grad_clip_norm": grad_clip_norm, "optimizer.update_clip_threshold": UPDATE_CLIP})


def as_tree(flat: dict) -> dict:
  """{("a", "b"): array} -> {"a": {"b": float32 jax array}}."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value, jnp.float32)
  return out


def leaf(tree: dict, path: tuple) -> jax.Array:
  for key in path:
    tree = tree[key]
  return tree


def learning_rate(t: int) -> float:
  """Update t (from 1): linear warmup from 0 over WARMUP updates, then linear decay to 0."""
  k = t - 1
  if k < WARMUP:
    return LR * k / WARMUP
  return LR * (1.0 - (k - WARMUP) / (TOTAL - WARMUP))


class ReferenceAdafactor:
  """The paper's Adafactor (beta1 0.9 EMA momentum, beta2 0.999 with Adam's bias correction,
  decoupled weight decay lr_t * wd) as configs/coca.py documents it, in float64 NumPy."""

  def __init__(self, params: dict, grad_clip_norm: float):
    self.grad_clip_norm = grad_clip_norm
    self.t = 0
    self.m = {k: np.zeros_like(p) for k, p in params.items()}
    self.v = {k: None for k in params}  # (row, col) or full second moment
    self.clipped_updates = 0  # how often update clipping acted

  @staticmethod
  def factored_axes(shape):
    if len(shape) < 2:
      return None
    a, b = np.argsort(shape)[-2:]
    return (int(a), int(b)) if shape[a] >= 128 else None

  def step(self, params: dict, grads: dict) -> dict:
    self.t += 1
    t, lr = self.t, learning_rate(self.t)
    if self.grad_clip_norm:
      norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
      grads = {k: g * min(1.0, self.grad_clip_norm / norm) for k, g in grads.items()}
    beta = B2 * (1 - B2 ** (t - 1)) / (1 - B2 ** t)  # Adam's bias-corrected average
    out = {}
    for k, p in params.items():
      g2 = grads[k] ** 2 + EPS
      axes = self.factored_axes(p.shape)
      if axes is None:
        v = g2 if self.v[k] is None else beta * self.v[k] + (1 - beta) * g2
        self.v[k], v_hat = v, v
      else:  # Shazeer & Stern: V ~ R C / mean(R) over each matrix of the two axes
        a, b = axes
        row, col = g2.mean(axis=b, keepdims=True), g2.mean(axis=a, keepdims=True)
        if self.v[k] is not None:
          row = beta * self.v[k][0] + (1 - beta) * row
          col = beta * self.v[k][1] + (1 - beta) * col
        self.v[k] = (row, col)
        v_hat = row * col / row.mean(axis=a, keepdims=True)
      u = grads[k] / np.sqrt(v_hat)
      rms = math.sqrt(float(np.mean(u * u)))
      if rms > UPDATE_CLIP:
        u, self.clipped_updates = u / (rms / UPDATE_CLIP), self.clipped_updates + 1
      self.m[k] = B1 * self.m[k] + (1 - B1) * lr * u
      decay = WD * lr * p if k[-1] not in NO_DECAY_NAMES else 0.0
      new = p - self.m[k] - decay
      out[k] = np.minimum(new, math.log(100.0)) if k[-1] == "logit_scale" else new
    return out


@pytest.mark.parametrize("grad_clip_norm", [0.0, 1.0])
def test_adafactor_matches_the_update_rule(grad_clip_norm):
  rng = np.random.default_rng(0)
  # float32 values: both implementations start every update from the same parameters.
  params = {k: rng.normal(0, 1, s).astype(np.float32).astype(np.float64)
            for k, s in SHAPES.items()}
  params[("logit_scale",)] = np.array(np.float32(math.log(100.0) - 0.01), np.float64)
  optimizer = make_optimizer(adafactor_config(grad_clip_norm))
  state = optimizer.init(as_tree(params))
  is_factored = lambda x: isinstance(x, optax.FactoredState)
  (factored,) = [x for x in jax.tree.leaves(state, is_leaf=is_factored) if is_factored(x)]
  assert factored.v_row["dense"]["kernel"].shape == (128,)  # as the reference factors
  assert factored.v_col["stack"]["kernel"].shape == (2, 160)
  assert factored.v["small"]["kernel"].shape == (8, 4)
  update = jax.jit(optimizer.update)
  reference = ReferenceAdafactor(params, grad_clip_norm)
  for step in range(TOTAL - 1):
    # Gradients of changing scale (so beta2 and the clipping matter), some rows much larger.
    scale = 10.0 ** rng.uniform(-3, 1)
    grads = {k: scale * rng.normal(0, 1, s) * rng.choice([1.0, 20.0], s) for k, s in
             SHAPES.items()}
    grads[("logit_scale",)] = np.array(-scale)  # pushes the logit scale up, past the cap
    expected = reference.step(params, grads)
    updates, state = update(as_tree(grads), state, as_tree(params))
    got = {k: np.asarray(leaf(updates, k), np.float64) for k in SHAPES}
    for k in SHAPES:
      want = expected[k] - params[k]
      atol = 2e-6 * max(np.abs(want).max(), 1e-30)
      if k == ("logit_scale",):  # projected as min(p + u, bound) - p: float32 rounding of p
        atol += 2 * np.spacing(np.float32(params[k]))
      np.testing.assert_allclose(got[k], want, rtol=0, atol=atol,
                                 err_msg=f"{k} at update {step + 1}")
    params = {k: (params[k] + got[k]).astype(np.float32).astype(np.float64) for k in SHAPES}
  assert reference.clipped_updates > 0  # update clipping was exercised
  assert params[("logit_scale",)] <= np.float32(math.log(100.0))


def logit_scale_setup(name: str):
  """(config, model, zero parameters): shapes,tiny (AdamW), coca tiny (Adafactor) or FLAVA
  tiny. The parameters other than the log-scale do not matter here, so they are zeros of the
  traced shapes (no init compute)."""
  if name == "shapes":
    config = helpers.tiny_config()
  else:
    config = {"coca": coca, "flava": flava}[name].get_config("tiny")
  model = models.build_model(config)
  init = lambda: model.init(jax.random.key(0), *state_lib.dummy_inputs(config))["params"]
  shapes = jax.eval_shape(lambda: nn.unbox(init()))
  return config, model, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


@pytest.mark.parametrize("name", ["shapes", "coca", "flava"])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_logit_scale_cannot_freeze_above_its_cap(name, direction):
  """A log-scale above log(100), e.g. from a checkpoint or a large step: the effective scale
  is 100 at most, the loss's gradient still reaches the parameter, and the optimizer brings
  the parameter under the cap, from where it moves wherever the gradient says (a plain
  min(exp(p), 100) has no gradient there and would hold it above the cap for good)."""
  config, model, params = logit_scale_setup(name)
  cap = math.log(config.model.logit_scale_max)
  params["logit_scale"] = jnp.float32(cap + 0.5)
  scale = lambda p: model.apply({"params": p}, method="logit_scale")
  loss = lambda p: direction * scale(p)  # direction 1: wants the scale lower
  optimizer = make_optimizer(config)
  state = optimizer.init(params)
  assert float(scale(params)) == pytest.approx(100.0, rel=1e-6)
  assert float(jax.grad(loss)(params)["logit_scale"]) == pytest.approx(100.0 * direction,
                                                                      rel=1e-5)
  step = jax.jit(lambda p, s: optimizer.update(jax.grad(loss)(p), s, p))
  trajectory = []
  for _ in range(4):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    trajectory.append(float(params["logit_scale"]))
    assert float(scale(params)) <= 100.0 * (1 + 1e-6)
  assert all(p <= cap + 1e-6 for p in trajectory)
  if direction > 0:  # it came back under the cap and keeps going down
    assert trajectory[-1] < trajectory[-2] < cap - 1e-6
  else:  # held at the cap
    assert trajectory[-1] == pytest.approx(cap, abs=1e-6)
