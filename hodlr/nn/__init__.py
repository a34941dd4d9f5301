"""Layers for models: log-linear Mamba-2 and log-linear Gated DeltaNet as ``torch.nn.Module``s,
with a generation cache (docs/layers.md).

>>> import torch, hodlr.nn
>>> layer = hodlr.nn.LogLinearMamba2(num_heads=2, head_dim=8, hidden_size=8, state_size=4)
>>> x = torch.randn(3, 10, 8)
>>> y, cache = layer(x, use_cache=True)
>>> y.shape, cache.state.positions.tolist()
(torch.Size([3, 10, 8]), [10, 10, 10])

``import hodlr.nn`` imports torch (``import hodlr`` does not).
"""

from hodlr.nn.gated_deltanet import LogLinearGatedDeltaNet
from hodlr.nn.mamba2 import LogLinearMamba2
from hodlr.nn.modules import LayerCache, RMSNormGated, ShortConvolution, level_scales

__all__ = ["LayerCache", "LogLinearGatedDeltaNet", "LogLinearMamba2", "RMSNormGated", "ShortConvolution",
           "level_scales"]
