"""Linear-probe evaluator: a linear classifier on frozen image embeddings, for any model.

Features are the model's `encode_image` embeddings (the L2-normalised contrastive
embedding every mmjax model exposes, via `evaluate.Embedder`), so the probe works for
CoCa, UniCL and FLAVA checkpoints alike.

Classifier: closed-form ridge regression onto one-hot targets (a least-squares classifier),
solved in float64 NumPy: W = (X^T X + lambda * n * I)^-1 X^T Y with a bias column (not
penalised). Chosen over logistic regression by gradient descent because it is exact,
deterministic and takes milliseconds; on normalised features its accuracy is typically
close to logistic regression's. lambda is picked from `l2_grid` by accuracy on a held-out
`holdout_fraction` of the probe's training examples, then refit on all of them.

Config (`config.evals.linear_probe`): dataset, train_split, split, image_key, label_key,
num_train, num_examples, l2_grid, holdout_fraction. Reports
`linear_probe/<dataset>/top1` and `.../lambda`.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from mmjax.data import pipeline


def ridge_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float) -> np.ndarray:
  """x [n, d], y int [n] -> weights [d + 1, C] (last row = bias)."""
  n, d = x.shape
  xb = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
  targets = np.eye(num_classes)[y]
  reg = l2 * n * np.eye(d + 1)
  reg[d, d] = 0.0  # the bias is not shrunk
  return np.linalg.solve(xb.T @ xb + reg, xb.T @ targets)


def ridge_predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """weights [d + 1, C], x [n, d] -> predicted class int [n]."""
  return np.argmax(x @ w[:-1] + w[-1], axis=1)


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, num_classes: int, l2_grid: tuple[float, ...],
                  holdout_fraction: float) -> tuple[float, float]:
  """Selects lambda on a holdout of the train set, refits on all of it.

  Returns (top-1 accuracy on the test set, chosen lambda).
  """
  n_hold = int(round(len(train_x) * holdout_fraction))
  best = l2_grid[0]
  if 0 < n_hold < len(train_x) and len(l2_grid) > 1:
    fit_x, fit_y = train_x[n_hold:], train_y[n_hold:]
    hold_x, hold_y = train_x[:n_hold], train_y[:n_hold]
    scores = [(ridge_predict(ridge_fit(fit_x, fit_y, num_classes, l2), hold_x) == hold_y).mean()
              for l2 in l2_grid]
    best = l2_grid[int(np.argmax(scores))]  # first (smallest) lambda among ties
  w = ridge_fit(train_x, train_y, num_classes, best)
  return float((ridge_predict(w, test_x) == test_y).mean()), float(best)


class LinearProbe:
  """Evaluator (same interface as evaluate.ZeroShot): __call__(embedder, params) -> metrics."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any = None):
    del tokenizer  # images only
    e = config.evals.linear_probe
    self.name = e.dataset.replace("/", "_")
    load = lambda split, n: pipeline.load_eval_split(
        config, dataset=e.dataset, split=split, image_key=e.image_key, label_key=e.label_key,
        num_examples=n)
    train, test = load(e.train_split, e.num_train), load(e.split, e.num_examples)
    self.train_images, self.train_labels = train["images"], train["labels"]
    self.test_images, self.test_labels = test["images"], test["labels"]
    self.num_classes = len(train["class_names"])
    self.l2_grid = tuple(float(x) for x in e.l2_grid)
    self.holdout_fraction = float(e.holdout_fraction)

  def __call__(self, embedder: Any, params: Any) -> dict[str, float]:
    train_x = embedder.images(params, self.train_images)
    test_x = embedder.images(params, self.test_images)
    top1, l2 = fit_and_score(train_x, self.train_labels, test_x, self.test_labels,
                             self.num_classes, self.l2_grid, self.holdout_fraction)
    return {f"linear_probe/{self.name}/top1": top1, f"linear_probe/{self.name}/lambda": l2}
