"""Heads: the SimCLR projection MLP (pretraining) and the linear classifier (CLMAN)."""

from __future__ import annotations

from torch import nn


class ProjectionHead(nn.Sequential):
    """SimCLR projection MLP (paper Eq. 2): num_layers Linear layers with ReLU between them.

    (N, in_dim) -> (N, out_dim); hidden_dim defaults to in_dim. num_layers=1 is a linear map.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, num_layers: int = 2):
        if num_layers < 1:
            raise ValueError(f"projection num_layers must be >= 1, got {num_layers}")
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.Linear(d_in, d_out))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


class LinearHead(nn.Linear):
    """The paper's linear classifier on the aggregated clip feature: (B, D) -> (B, num_classes)."""

    def __init__(self, in_dim: int, num_classes: int = 2):
        super().__init__(in_dim, num_classes)
