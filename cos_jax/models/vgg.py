"""VGG-16 with average pooling, as the COS/QCFS reference builds it."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cos_jax.models.common import QCFSNet, conv_bn_act_blocks

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                (512, 512, 512))


class VGG(QCFSNet):
  """Blocks of conv3x3(bias)+BN+act, 2x2 avg-pool after each block, then a
  4096-4096 classifier with activations (dropout 0).

  The flattened feature size follows the input: 512 on 32x32 CIFAR images,
  7·7·512 = 25088 on 224x224 ImageNet images (``stem`` is accepted for a
  uniform interface; VGG's layers are the same for both).
  """
  blocks: Sequence[Sequence[int]] = VGG16_BLOCKS
  hidden: int = 4096
  stem: str = 'cifar'

  @nn.compact
  def __call__(self, x, train: bool = False):
    layers = self.layers(train)
    x = conv_bn_act_blocks(x, self.blocks, layers)
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = layers.act()(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)
