"""The reference's probe training loop, in PyTorch, as the paper's code runs it.

One probe, fold and seed at a time: seed torch, build the MLP, AdamW(1e-3, weight decay 0.01),
CosineAnnealingLR over the epochs stepped once per epoch, a shuffled `DataLoader` of batch 64,
Huber(1) on sign-log targets, then R^2 on the held-out fold in sign-log space. This is the baseline
`bench_probes.py` times against; it is not used by the library.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def reference_probe(input_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(input_dim, 512), nn.SiLU(), nn.Dropout(0.1),
        nn.Linear(512, 128), nn.SiLU(), nn.Dropout(0.05),
        nn.Linear(128, 1),
    )


def train_reference_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                          seed: int, epochs: int, batch_size: int = 64, lr: float = 1e-3,
                          weight_decay: float = 0.01) -> float:
    """Train one probe and return its R^2 on the test rows (targets already sign-log encoded)."""
    torch.manual_seed(seed)
    model = reference_probe(x_train.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
                        batch_size=batch_size, shuffle=True)
    loss_fn = nn.HuberLoss(delta=1.0)
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb).squeeze(-1), yb)
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).squeeze(-1).numpy().astype(np.float64)
    y = y_test.astype(np.float64)
    return float(1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))
