"""The small default network: a VGG-style net that trains on Fashion-MNIST on a CPU."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cos_jax.activation import Activation, SpikingConfig
from cos_jax.models.common import avg_pool, batch_norm, conv3x3


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
    index = 0
    for stage in self.stages:
      for features in stage:
        x = conv3x3(features)(x)
        x = batch_norm(train)(x)
        x = Activation(self.levels, self.spiking, static_input=index == 0,
                       threshold_init=self.threshold_init)(x)
        index += 1
      x = avg_pool(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden)(x)
    x = Activation(self.levels, self.spiking,
                   threshold_init=self.threshold_init)(x)
    return nn.Dense(self.num_classes)(x)
