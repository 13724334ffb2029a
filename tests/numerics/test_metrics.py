"""Next-token and tensor comparison metrics (pure functions)."""

from __future__ import annotations

import torch

from nvila_quant.numerics import metrics


def test_metrics_pure_functions():
    a = torch.randn(5, 11)
    assert torch.allclose(metrics.kl_divergence(a, a), torch.zeros(5), atol=1e-7)
    b = a.clone()
    b[2] = -b[2]
    kl = metrics.kl_divergence(a, b)
    assert kl[2] > 0 and kl[0] == 0
    assert metrics.top1_agreement(a, b).tolist() == [1, 1, 0, 1, 1]
    assert metrics.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert metrics.first_divergence([1, 2], [1, 2]) is None
    assert metrics.first_divergence([1, 2], [1, 2, 3]) == 2
    assert metrics.perplexity(0.0, 10) == 1.0
