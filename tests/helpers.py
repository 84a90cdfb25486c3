"""Small data helpers shared by the solver tests."""
import torch


def blobs(seed: int, per_class: int, num_classes: int = 4, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class means (the means do not depend on ``seed``)."""
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return means[y] + torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed)), y
