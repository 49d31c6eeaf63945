"""ResNet-18/20/34 with the activation after the residual addition."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cos_jax.activation import Activation, SpikingConfig
from cos_jax.models.common import avg_pool, batch_norm, conv3x3, conv_init


class BasicBlock(nn.Module):
  """conv3x3-BN-act-conv3x3-BN, plus identity or 1x1 conv+BN shortcut, then act."""
  features: int
  stride: int
  levels: int
  spiking: SpikingConfig | None
  threshold_init: float

  @nn.compact
  def __call__(self, x, train: bool):
    act = lambda: Activation(self.levels, self.spiking,
                             threshold_init=self.threshold_init)
    y = conv3x3(self.features, strides=self.stride, use_bias=False)(x)
    y = batch_norm(train)(y)
    y = act()(y)
    y = conv3x3(self.features, use_bias=False)(y)
    y = batch_norm(train)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), strides=self.stride, use_bias=False,
                  kernel_init=conv_init)(x)
      x = batch_norm(train)(x)
    return act()(y + x)


class ResNet(nn.Module):
  """ResNet of BasicBlocks.

  ``stem='cifar'``: conv3x3 (no bias) + BN + act, no pooling (the reference uses
  this stem for ImageNet too). ``stem='imagenet'``: conv7x7/2 + BN + act +
  3x3/2 *average* pool. The head is global average pooling and one dense layer.
  """
  stage_sizes: Sequence[int]
  stage_features: Sequence[int]
  num_classes: int = 10
  levels: int = 4
  stem: str = 'cifar'
  spiking: SpikingConfig | None = None
  threshold_init: float = 8.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stem == 'cifar':
      x = conv3x3(self.stage_features[0], use_bias=False)(x)
    elif self.stem == 'imagenet':
      x = nn.Conv(self.stage_features[0], (7, 7), strides=2, padding=3,
                  use_bias=False, kernel_init=conv_init)(x)
    else:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    x = batch_norm(train)(x)
    x = Activation(self.levels, self.spiking, static_input=True,
                   threshold_init=self.threshold_init)(x)
    if self.stem == 'imagenet':
      x = avg_pool(x, 3, 2, padding=((1, 1), (1, 1)))
    for stage, (blocks, features) in enumerate(
        zip(self.stage_sizes, self.stage_features)):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, stride, self.levels, self.spiking,
                       self.threshold_init)(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
