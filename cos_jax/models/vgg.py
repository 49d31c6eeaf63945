"""VGG-16 with average pooling, as the COS/QCFS reference builds it."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cos_jax.activation import Activation, SpikingConfig
from cos_jax.models.common import conv_bn_act_blocks

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                (512, 512, 512))


class VGG(nn.Module):
  """Blocks of conv3x3(bias)+BN+act, 2x2 avg-pool after each block, then a
  4096-4096 classifier with activations (dropout 0).

  The flattened feature size follows the input: 512 on 32x32 CIFAR images,
  7·7·512 = 25088 on 224x224 ImageNet images (``stem`` is accepted for a
  uniform interface; VGG's layers are the same for both).
  """
  num_classes: int = 10
  levels: int = 4
  blocks: Sequence[Sequence[int]] = VGG16_BLOCKS
  hidden: int = 4096
  stem: str = 'cifar'
  spiking: SpikingConfig | None = None
  threshold_init: float = 8.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv_bn_act_blocks(x, self.blocks, levels=self.levels,
                           spiking=self.spiking,
                           threshold_init=self.threshold_init, train=train,
                           conv_bias=True)
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = nn.Dense(self.hidden)(x)
      x = Activation(self.levels, self.spiking,
                     threshold_init=self.threshold_init)(x)
    return nn.Dense(self.num_classes)(x)
