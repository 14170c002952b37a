#!/usr/bin/env python
"""Build the bundled digits example: data splits (digits.npz) and weights (net.pt).

Deterministic: fixed seeds, single thread, deterministic algorithms.
Uses scikit-learn's bundled 8x8 digits (no download).

Usage (from the repository root or anywhere):
    python scripts/make_digits_example.py
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

SEED = 0
N_TRAIN = 1197
N_CALIB = 200
N_TEST = 400  # 1197 + 200 + 400 = 1797 = all samples
EPOCHS = 30
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "configs" / "digits"


def load_model_module():
    spec = importlib.util.spec_from_file_location("digits_model", OUT_DIR / "model.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def make_splits() -> dict[str, np.ndarray]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    assert len(x) == N_TRAIN + N_CALIB + N_TEST, len(x)
    perm = np.random.RandomState(SEED).permutation(len(x))
    tr = perm[:N_TRAIN]
    ca = perm[N_TRAIN : N_TRAIN + N_CALIB]
    te = perm[N_TRAIN + N_CALIB :]
    return {
        "train_x": np.ascontiguousarray(x[tr]),
        "train_y": np.ascontiguousarray(y[tr]),
        "calib_x": np.ascontiguousarray(x[ca]),
        "calib_y": np.ascontiguousarray(y[ca]),
        "test_x": np.ascontiguousarray(x[te]),
        "test_y": np.ascontiguousarray(y[te]),
    }


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    logits = model(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


def main() -> int:
    t0 = time.perf_counter()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    data = make_splits()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    npz_path = OUT_DIR / "digits.npz"
    np.savez_compressed(npz_path, **data)
    print(
        f"splits: train={len(data['train_y'])} calib={len(data['calib_y'])} "
        f"test={len(data['test_y'])} -> {npz_path} ({npz_path.stat().st_size} bytes)"
    )

    mod = load_model_module()
    model = mod.DigitsNet()
    xtr = torch.from_numpy(data["train_x"])
    ytr = torch.from_numpy(data["train_y"])
    n = len(ytr)
    steps_per_epoch = (n + BATCH_SIZE - 1) // BATCH_SIZE
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)

    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, BATCH_SIZE):
            idx = order[i : i + BATCH_SIZE]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}/{EPOCHS} loss={total / n:.4f}")

    model.eval()
    train_acc = accuracy(model, data["train_x"], data["train_y"])
    calib_acc = accuracy(model, data["calib_x"], data["calib_y"])
    test_acc = accuracy(model, data["test_x"], data["test_y"])

    pt_path = OUT_DIR / "net.pt"
    torch.save(model.state_dict(), pt_path)
    print(f"saved {pt_path} ({pt_path.stat().st_size} bytes)")
    print(f"fp32 train accuracy: {train_acc:.4f}")
    print(f"fp32 calib accuracy: {calib_acc:.4f}")
    print(f"fp32 test accuracy:  {test_acc:.4f}")
    print(f"elapsed: {time.perf_counter() - t0:.1f} s")
    if test_acc < 0.95:
        print("ERROR: test accuracy below 0.95", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
