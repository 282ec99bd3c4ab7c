"""The linear probe's classifiers (mmjax.evaluators.linear_probe) on synthetic features,
against their objectives written out in float64 NumPy here, and the probe on a model's
frozen image features (a random-init tiny FLAVA)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

import helpers
from mmjax import evaluators, runtime
from mmjax.evaluators import linear_probe


def test_linear_probe_standardizes_features():
  """Per-dimension rescaling of the features changes neither the accuracy nor the chosen
  lambda: the ridge penalty sees standardised features."""
  rng = np.random.default_rng(5)
  classes, d = 4, 12
  y = rng.integers(0, classes, 300)
  x = rng.normal(size=(classes, d))[y] * 0.7 + rng.normal(size=(300, d))
  scale = 10.0 ** rng.uniform(-3, 3, d)
  grid = (1e-4, 1e-2, 1.0, 10.0)
  plain = linear_probe.fit_and_score(x[:200], y[:200], x[200:], y[200:], classes, grid, 0.25,
                                     "ridge")
  scaled = linear_probe.fit_and_score(x[:200] * scale, y[:200], x[200:] * scale, y[200:],
                                      classes, grid, 0.25, "ridge")
  assert plain == scaled and plain[0] > 0.5
  train, test = linear_probe.standardize(x[:200] * scale + 5.0, x[200:] * scale + 5.0)
  np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-9)
  np.testing.assert_allclose(train.std(0), 1.0, rtol=1e-9)
  np.testing.assert_allclose(test, (x[200:] - x[:200].mean(0)) / x[:200].std(0), rtol=1e-6)


@pytest.mark.parametrize("classifier", ["ridge", "logistic"])
def test_linear_probe_classifiers_separate_and_stay_at_chance_on_noise(classifier):
  rng = np.random.default_rng(3)
  classes, d = 5, 16
  centers = rng.normal(size=(classes, d)) * 3
  y = rng.integers(0, classes, 400)
  x = centers[y] + rng.normal(size=(400, d))
  acc, l2 = linear_probe.fit_and_score(x[:300], y[:300], x[300:], y[300:], classes,
                                       (1e-4, 1e-2, 1.0), 0.2, classifier)
  assert acc > 0.95 and l2 in (1e-4, 1e-2, 1.0)
  # Random features: chance level, not better.
  chance, _ = linear_probe.fit_and_score(rng.normal(size=(300, d)), y[:300],
                                         rng.normal(size=(100, d)), y[300:], classes,
                                         (1e-2,), 0.0, classifier)
  assert chance < 0.4


def test_linear_probe_fits_solve_their_objectives():
  rng = np.random.default_rng(3)
  classes, d, n = 5, 16, 400
  y = rng.integers(0, classes, n)
  x = rng.normal(size=(classes, d))[y] + rng.normal(size=(n, d))
  xb = np.concatenate([x, np.ones((n, 1))], 1)
  targets = np.eye(classes)[y]
  # Ridge: the closed form solves the regularised normal equations.
  w = linear_probe.ridge_fit(x, y, classes, 0.1)
  reg = 0.1 * n * np.eye(d + 1)
  reg[d, d] = 0
  np.testing.assert_allclose((xb.T @ xb + reg) @ w, xb.T @ targets, atol=1e-8)
  # Logistic: at the returned weights the gradient of mean cross-entropy + l2/2 |W|^2
  # (bias unpenalised), computed here independently, vanishes.
  w = linear_probe.logistic_fit(x, y, classes, 0.01, gtol=1e-7)  # tighter than the default
  logits = xb @ w
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  grad = xb.T @ (probs - targets) / n + 0.01 * np.concatenate([w[:-1], np.zeros((1, classes))])
  assert np.abs(grad).max() < 1e-6, np.abs(grad).max()
  assert np.abs(w).max() > 0.1  # not the zero start
  with pytest.raises(ValueError, match="classifier"):
    linear_probe.fit_and_score(x, y, x, y, classes, (0.1,), 0.0, "svm")


def test_logistic_fit_returns_the_optimum_whatever_the_start_or_rounding():
  """The tiny shapes probe's regime (128 examples, 64 classes, separable, lambda 1e-5): the
  penalised weights must not depend on where the solver starts (the lambda path warm-starts
  it) nor on float rounding of the features (8 vs 1 device, AVX2 vs AVX-512). With
  scikit-learn's fixed gtol=1e-4 the warm start stopped after one iteration: its weights
  were 0.22 away from the cold start's, and one test split scored 0.078 vs 0.094."""
  rng = np.random.default_rng(0)
  classes, d, n = 64, 32, 128
  y = rng.integers(0, classes, n)
  x = rng.normal(size=(classes, d))[y] + 1.5 * rng.normal(size=(n, d))
  warm = linear_probe.logistic_fit(x, y, classes, 1e-4)
  from_warm = linear_probe.logistic_fit(x, y, classes, 1e-5, init=warm)[:-1]
  from_zero = linear_probe.logistic_fit(x, y, classes, 1e-5)[:-1]
  rounded = linear_probe.logistic_fit(x * (1 + 1e-6 * rng.standard_normal(x.shape)), y,
                                      classes, 1e-5)[:-1]
  scale = np.abs(from_zero).max()
  assert scale > 1.0  # far from the zero start
  # Both within sqrt(33 * 64) * OPTIMUM_TOL = 0.046 of the optimum (strong convexity).
  assert np.abs(from_warm - from_zero).max() < 0.01
  assert np.abs(rounded - from_zero).max() < 0.01


def test_linear_probe_reads_image_features_and_beats_chance():
  """Synthetic separable classes (one colour per class, noisy) through a random-init tiny
  FLAVA: the probe reads `Embedder.features` (the model's image_features), never the
  contrastive embedding, and classifies far above chance (0.25)."""
  config = helpers.flava_config(batch_size=8)
  rt = runtime.build(config, jax.devices()[:1], params_only=True)
  model, mesh = rt.model, rt.mesh
  params = helpers.init_params(config, model)
  rng = np.random.default_rng(6)
  colours = rng.uniform(-0.8, 0.8, (4, 3))

  size = config.data.image_size

  def split(n):
    y = rng.integers(0, 4, n).astype(np.int32)
    x = colours[y][:, None, None, :] + rng.normal(0, 0.1, (n, size, size, 3))
    return np.clip(x, -1, 1).astype(np.float32), y

  (train_x, train_y), (test_x, test_y) = split(128), split(64)

  class Spy(evaluators.Embedder):
    calls = 0

    def features(self, params, images):
      Spy.calls += 1
      return super().features(params, images)

    def images(self, params, images):
      raise AssertionError("the linear probe read the contrastive embedding")

  probe = linear_probe.LinearProbe.from_arrays("linear_probe/synthetic", train_x, train_y,
                                               test_x, test_y, num_classes=4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
    result = probe(Spy(model, mesh, config.mesh.rules, batch_size=64), params)
  assert Spy.calls == 2
  assert result["linear_probe/synthetic/top1"] > 0.9, result


def test_logistic_fit_past_its_iteration_limit_warns_and_returns():
  """A fit cut short by max_iter returns its weights with a RuntimeWarning saying so (an
  evaluation inside a training run must not end it)."""
  rng = np.random.default_rng(0)
  y = rng.integers(0, 8, 64)
  x = rng.normal(size=(8, 16))[y] + rng.normal(size=(64, 16))
  with pytest.warns(RuntimeWarning, match=r"stopped at 3 iterations short of the optimum "
                    r"of lambda=1e-05.*l2_grid"):
    w = linear_probe.logistic_fit(x, y, 8, 1e-5, max_iter=3)
  assert w.shape == (17, 8) and np.abs(w).max() > 0
