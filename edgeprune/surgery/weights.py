"""A consumer's repaired weights written into its layer: the one piece of layer surgery that both the independent
repair (`prune.compensate_consumers`) and the sequential one (`repair.sequential_repair`) perform.

    set_weights(conv, keep, w_new, b_new)      # W' in the kept input columns, zeros elsewhere; bias b'
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def set_weights(m: nn.Module, keep: np.ndarray, w_new: np.ndarray, b_new: np.ndarray | None) -> None:
    """Weight with only the `keep` columns (W' there, zeros elsewhere), and bias b' (None keeps the bias as is)."""
    full = np.zeros((m.weight.shape[0], int(np.prod(m.weight.shape[1:]))))
    full[:, keep] = w_new
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(full.reshape(m.weight.shape)).to(m.weight.dtype))
        if b_new is None:
            return
        if m.bias is None:
            m.bias = nn.Parameter(torch.from_numpy(b_new).to(m.weight.dtype))
        else:
            m.bias.copy_(torch.from_numpy(b_new).to(m.bias.dtype))
