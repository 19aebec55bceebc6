"""Classes for whole-model and policy tests; importable by qualified name, as a user's package is."""

from __future__ import annotations

import torch

REGISTRY: dict[str, int] = {"kept": 1}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.act = torch.nn.ReLU()
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)) * self.scale


class Plain:
    """A plain class: BUILD on the class object itself would set class attributes."""

    value = 1
