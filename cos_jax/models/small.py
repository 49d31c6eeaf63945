"""The small default network: a VGG-style net that trains on Fashion-MNIST on a CPU."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cos_jax.models.common import QCFSNet, conv_bn_act_blocks


class SmallNet(QCFSNet):
  """conv-BN-act stages, each closed by 2x2 average pooling, then an MLP head.

  Default: [32] pool [64 64] pool [128] pool -> 256 -> classes (about 15M MACs
  per 28x28 image, 0.43M parameters).
  """
  stages: Sequence[Sequence[int]] = ((32,), (64, 64), (128,))
  hidden: int = 256

  @nn.compact
  def __call__(self, x, train: bool = False):
    layers = self.layers(train)
    x = conv_bn_act_blocks(x, self.stages, layers)
    x = x.reshape((x.shape[0], -1))
    x = layers.act()(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)
