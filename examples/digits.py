"""Train a ternary MLP (64-256-10) on scikit-learn's bundled 8x8 digits.

Every weight is a trit with an int8 row scale; training keeps only int8 accumulators
(TritFlip). Run:  python examples/digits.py  [--steps 800] [--seed 0]
Needs scikit-learn (the `test` extra) for the data, which ships inside the package.
"""

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits

import tritnet
import tritnet.functional as F
from tritnet import rng as trandom
from tritnet.nn import Module, TernaryLinear
from tritnet.optim import TritFlip


class MLP(Module):
    def __init__(self, n_in, hidden, n_out):
        super().__init__()
        self.fc1 = TernaryLinear(n_in, hidden)
        self.fc2 = TernaryLinear(hidden, n_out)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def load(seed, n_train=1400):
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    X = digits.data[order].astype(np.float32)
    y = digits.target[order].astype(np.int64)
    # standardise with the training split's statistics only
    mean, std = X[:n_train].mean(0), X[:n_train].std(0) + 1e-3
    X = (X - mean) / std
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def accuracy(model, X, y):
    with tritnet.no_grad():
        logits = model(tritnet.tensor(X)).numpy()
    return float((logits.argmax(1) == y).mean())


def main(steps=800, batch_size=64, hidden=256, seed=0, log_every=100):
    (X, y), (X_test, y_test) = load(seed)
    trandom.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = MLP(64, hidden, 10)
    opt = TritFlip(model, seed=seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(X), batch_size)
        loss = F.cross_entropy(model(tritnet.tensor(X[idx])), tritnet.tensor(y[idx]))
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  "
                  f"held-out accuracy {accuracy(model, X_test, y_test):.4f}")
    acc = accuracy(model, X_test, y_test)
    print(f"final held-out accuracy {acc:.4f} after {steps} steps "
          f"({time.perf_counter() - start:.1f} s on {tritnet.backend.device()})")
    return acc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    main(a.steps, a.batch_size, a.hidden, a.seed)
