"""Linear-probe evaluator: a linear classifier on frozen image features, for any model.

Features are the model's `image_features(images)` (via `Embedder.features`): the
image representation before the projection to the contrastive embedding space, as CLIP's
linear probes use (FLAVA: the image encoder's CLS output; CoCa: the contrastive pooler's
output; each model's docstring says why). Not the L2-normalised contrastive embedding,
which keeps only what the text side matches.

Each feature is standardised (zero mean, unit variance over the probe's training
examples; the same affine map is applied to the test examples), so the L2 penalty treats
every dimension alike whatever the encoder's activation scales.

Classifiers (`classifier`), both in float64 NumPy/SciPy, deterministic, a bias column
that is not penalised:
  * "logistic" (default; CLIP's probe): multinomial logistic regression, mean
    cross-entropy + lambda/2 * |W|^2, minimised by trust-region Newton (scipy.optimize,
    exact Hessian-vector products) with a stopping rule that pins the unique optimum (see
    `logistic_fit`), warm-started along the lambda grid.
  * "ridge": closed-form ridge regression onto one-hot targets (a least-squares
    classifier), W = (X^T X + lambda * n * I)^-1 X^T Y. Milliseconds, but with many
    classes and few dimensions least squares is a poor classifier (a class's score is
    linear, so it cannot win only in its own region), so it reads lower.
lambda is picked from `l2_grid` by accuracy on a held-out `holdout_fraction` of the
probe's training examples (the first ones), then the classifier is refit on all of them.

Config (`config.evals.<key>`, type "linear_probe"): dataset, train_split, split,
image_key, label_key, num_train, num_examples, l2_grid, holdout_fraction, classifier.
Reports `linear_probe/<dataset>/top1` and `.../lambda` (the entry's key instead of
`linear_probe` when it is not the type's name).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
import scipy.optimize

from configs import schema
from mmjax.data import pipeline
from mmjax.evaluators.base import Evaluator
from mmjax.evaluators.embedder import ProgressLine


def ridge_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
              init: np.ndarray | None = None) -> np.ndarray:
  """x [n, d], y int [n] -> weights [d + 1, C] (last row = bias). `init` is unused (the
  solution is closed-form)."""
  del init
  n, d = x.shape
  xb = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
  targets = np.eye(num_classes)[y]
  reg = l2 * n * np.eye(d + 1)
  reg[d, d] = 0.0  # the bias is not shrunk
  return np.linalg.solve(xb.T @ xb + reg, xb.T @ targets)


# Stopping rule of `logistic_fit`: the gradient's largest component must fall below
# OPTIMUM_TOL * lambda (the distance bound to the optimum, see there); without a penalty
# (lambda = 0, no strong convexity) a fixed tolerance is all there is.
OPTIMUM_TOL = 1e-3
UNREGULARISED_GTOL = 1e-7
# Newton iterations per fit before giving up with a warning. Newton converges in tens: the
# trained shapes CoCa's probe (3200 x 128 features, 64 classes, lambda 1e-2 .. 1e-5) took
# 9-21 each, where L-BFGS stopped at 3000 iterations short of the optimum at 1e-4 and 1e-5.
MAX_ITER = 200


def logistic_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                 init: np.ndarray | None = None, max_iter: int = MAX_ITER,
                 gtol: float | None = None) -> np.ndarray:
  """Multinomial logistic regression: x [n, d], y int [n] -> weights [d + 1, C] (last row =
  bias), minimising mean cross-entropy + l2/2 * |W without bias|^2 from `init` (weights
  [d + 1, C]; zero by default) by trust-region Newton with exact Hessian-vector products
  (scipy's trust-ncg).

  The penalised weights returned are those of the unique optimum, not wherever the
  optimiser happened to stop: the objective is l2-strongly convex in them, so their
  distance to the optimum is at most |grad|_2 / l2, and the solver stops only once the
  gradient's norm (so every component) is below `gtol` = OPTIMUM_TOL * l2 (by default).
  A fixed gtol (scikit-learn's 1e-4, used before) allowed a distance of 1e-4 / l2 = 10 per
  component at l2 = 1e-5: the stopping point then depended on the start and on float
  rounding of the features, and a checkpoint probed on 1 device scored differently from
  the same checkpoint probed by an 8-device trainer on an AVX-512 CPU. Near-separable
  features make the problem ill-conditioned at small lambda, where a first-order method
  (L-BFGS, used before) ran out of iterations; Newton's steps use the curvature. (The
  unpenalised biases are only determined up to a common shift, which no prediction sees;
  a class without training examples has its bias driven towards -inf, so it is never
  predicted.) After `max_iter` iterations it stops with a RuntimeWarning saying the
  weights are short of the optimum (an evaluation must not end a training run).
  """
  if gtol is None:
    gtol = OPTIMUM_TOL * l2 if l2 > 0 else UNREGULARISED_GTOL
  n, d = x.shape
  xb = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
  rows = np.arange(n)
  at = {}  # the softmax at the last weights seen: the gradient and Hessian share it

  def softmax(flat: np.ndarray) -> dict[str, np.ndarray]:
    if at.get("flat") is None or not np.array_equal(at["flat"], flat):
      logits = xb @ flat.reshape(d + 1, num_classes)
      logits -= logits.max(axis=1, keepdims=True)
      probs = np.exp(logits)
      z = probs.sum(axis=1, keepdims=True)
      at.update(flat=flat.copy(), logits=logits, z=z, probs=probs / z)
    return at

  def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
    w, s = flat.reshape(d + 1, num_classes), softmax(flat)
    loss = (np.log(s["z"][:, 0]) - s["logits"][rows, y]).mean() + 0.5 * l2 * np.sum(w[:-1] ** 2)
    residual = s["probs"].copy()
    residual[rows, y] -= 1.0  # d loss / d logits, times n
    grad = xb.T @ residual / n
    grad[:-1] += l2 * w[:-1]
    return loss, grad.ravel()

  def hessian_times(flat: np.ndarray, v: np.ndarray) -> np.ndarray:
    """H v: the softmax Jacobian (diag(p) - p p^T per example) between X^T and X, + l2."""
    probs, v = softmax(flat)["probs"], v.reshape(d + 1, num_classes)
    a = probs * (xb @ v)
    a -= probs * a.sum(axis=1, keepdims=True)
    h = xb.T @ a / n
    h[:-1] += l2 * v[:-1]
    return h.ravel()

  start = np.zeros((d + 1) * num_classes) if init is None else np.ravel(init)
  result = scipy.optimize.minimize(objective, start, jac=True, hessp=hessian_times,
                                   method="trust-ncg",
                                   options={"maxiter": max_iter, "gtol": gtol})
  if np.abs(result.jac).max() > gtol:
    # An evaluation must never end a training run; say plainly what the number is worth.
    warnings.warn(f"linear probe: stopped at {result.nit} iterations short of the optimum "
                  f"of lambda={l2} (largest gradient component {np.abs(result.jac).max():.3g} "
                  f"> {gtol:.3g}): its score may depend on the start and on float rounding; "
                  "drop the smallest config evals.<key>.l2_grid values to converge",
                  RuntimeWarning, stacklevel=2)
  return result.x.reshape(d + 1, num_classes)


CLASSIFIERS = {"logistic": logistic_fit, "ridge": ridge_fit}


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """weights [d + 1, C] (either classifier), x [n, d] -> predicted class int [n]."""
  return np.argmax(x @ w[:-1] + w[-1], axis=1)


def standardize(train_x: np.ndarray,
                test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both [n, d] -> float64, each column shifted and scaled by the train set's mean and
  standard deviation (a constant column is only centred)."""
  train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  mean, std = train_x.mean(0), train_x.std(0)
  std = np.where(std > 1e-9 * (1.0 + np.abs(mean)), std, 1.0)  # float noise of a constant
  return (train_x - mean) / std, (test_x - mean) / std


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, num_classes: int, l2_grid: tuple[float, ...],
                  holdout_fraction: float,
                  classifier: str = "logistic",
                  on_fit: Callable[[int, int], None] | None = None) -> tuple[float, float]:
  """Standardises the features, selects lambda on a holdout of the train set, refits on
  all of it. `on_fit(done, total)` after each fit (progress).

  Returns (top-1 accuracy on the test set, chosen lambda).
  """
  if classifier not in CLASSIFIERS:
    raise ValueError(f"config evals.linear_probe.classifier={classifier!r}: choose one of "
                     f"{list(CLASSIFIERS)}")
  fit = CLASSIFIERS[classifier]
  train_x, test_x = standardize(train_x, test_x)
  n_hold = int(round(len(train_x) * holdout_fraction))
  best, w = l2_grid[0], None
  if 0 < n_hold < len(train_x) and len(l2_grid) > 1:
    fit_x, fit_y = train_x[n_hold:], train_y[n_hold:]
    hold_x, hold_y = train_x[:n_hold], train_y[:n_hold]
    scores, fits = {}, {}
    # Strongest penalty first, each fit warm-started from the previous one (a regularisation
    # path: fewer Newton iterations than from zero at small lambda).
    for i, l2 in enumerate(sorted(l2_grid, reverse=True)):
      w = fits[l2] = fit(fit_x, fit_y, num_classes, l2, w)
      if on_fit:
        on_fit(i + 1, len(l2_grid) + 1)
      scores[l2] = (predict(w, hold_x) == hold_y).mean()
    best = max(sorted(l2_grid), key=lambda l2: scores[l2])  # smallest lambda among ties
    w = fits[best]
  w = fit(train_x, train_y, num_classes, best, w)
  if on_fit:
    on_fit(len(l2_grid) + 1, len(l2_grid) + 1)
  return float((predict(w, test_x) == test_y).mean()), float(best)


class LinearProbe(Evaluator):
  """Evaluator: a linear classifier on the frozen image features (`evals.<key>`: dataset,
  train_split, split, image_key, label_key, class_names, num_train, num_examples, l2_grid,
  holdout_fraction, classifier)."""
  METRIC_PREFIX = "linear_probe"
  section = staticmethod(schema.linear_probe_eval)
  choices = {"classifier": tuple(CLASSIFIERS)}

  def __init__(self, key: str, config: ml_collections.ConfigDict, tokenizer: Any = None):
    del tokenizer  # images only
    super().__init__(key, config)
    e = self.entry
    train = pipeline.load_eval_split(config, key, num_examples=e.num_train,
                                     split_key="train_split")
    test = pipeline.load_eval_split(config, key, num_examples=e.num_examples)
    self._set(self.name, train["images"], train["labels"], test["images"], test["labels"],
              len(train["class_names"]), e.l2_grid, e.holdout_fraction, e.classifier)

  @classmethod
  def from_arrays(cls, name: str, train_images: np.ndarray, train_labels: np.ndarray,
                  test_images: np.ndarray, test_labels: np.ndarray, num_classes: int,
                  l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1),
                  holdout_fraction: float = 0.2,
                  classifier: str = "logistic") -> "LinearProbe":
    """A probe over images already in memory ([N, H, W, 3] as the model takes them: uint8
    pixels or floating point in [-1, 1]; labels int);
    metrics are named `<name>/top1` and `<name>/lambda`."""
    probe = cls.__new__(cls)
    probe._set(name, train_images, train_labels, test_images, test_labels, num_classes,
               l2_grid, holdout_fraction, classifier)
    return probe

  def _set(self, name, train_images, train_labels, test_images, test_labels, num_classes,
           l2_grid, holdout_fraction, classifier) -> None:
    self.name = name
    self.train_images, self.train_labels = train_images, np.asarray(train_labels)
    self.test_images, self.test_labels = test_images, np.asarray(test_labels)
    self.num_classes = int(num_classes)
    self.l2_grid = tuple(float(x) for x in l2_grid)
    self.holdout_fraction = float(holdout_fraction)
    self.classifier = classifier

  def __call__(self, embedder: Any, params: Any) -> dict[str, float]:
    train_x = embedder.features(params, self.train_images)
    test_x = embedder.features(params, self.test_images)
    meter = ProgressLine(f"{self.name} classifier", len(self.l2_grid) + 1, unit="fits",
                         quiet_s=10)
    top1, l2 = fit_and_score(train_x, self.train_labels, test_x, self.test_labels,
                             self.num_classes, self.l2_grid, self.holdout_fraction,
                             self.classifier, on_fit=lambda done, total: meter.update(done))
    return {f"{self.name}/top1": top1, f"{self.name}/lambda": l2}
