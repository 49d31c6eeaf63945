"""The small default network: a VGG-style net that trains on Fashion-MNIST on a CPU."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cos_jax.activation import Activation, SpikingConfig
from cos_jax.models.common import conv_bn_act_blocks


class SmallNet(nn.Module):
  """conv-BN-act stages, each closed by 2x2 average pooling, then an MLP head.

  Default: [32] pool [64 64] pool [128] pool -> 256 -> classes (about 15M MACs
  per 28x28 image, 0.43M parameters).
  """
  num_classes: int = 10
  levels: int = 4
  stages: Sequence[Sequence[int]] = ((32,), (64, 64), (128,))
  hidden: int = 256
  spiking: SpikingConfig | None = None
  threshold_init: float = 8.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv_bn_act_blocks(x, self.stages, levels=self.levels,
                           spiking=self.spiking,
                           threshold_init=self.threshold_init, train=train,
                           conv_bias=True)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden)(x)
    x = Activation(self.levels, self.spiking,
                   threshold_init=self.threshold_init)(x)
    return nn.Dense(self.num_classes)(x)
