"""ResNet-18/20/34 with the activation after the residual addition."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cos_jax.models.common import Layers, QCFSNet, avg_pool

STEMS = ('cifar', 'imagenet')


class BasicBlock(nn.Module):
  """conv3x3-BN-act-conv3x3-BN, plus identity or 1x1 conv+BN shortcut, then act."""
  features: int
  stride: int
  layers: Layers

  @nn.compact
  def __call__(self, x):
    conv, norm, act = self.layers
    y = conv(self.features, (3, 3), self.stride, padding=1, use_bias=False)(x)
    y = act()(norm()(y))
    y = norm()(conv(self.features, (3, 3), padding=1, use_bias=False)(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = norm()(conv(self.features, (1, 1), self.stride, use_bias=False)(x))
    return act()(y + x)


class ResNet(QCFSNet):
  """ResNet of BasicBlocks.

  ``stem='cifar'``: conv3x3 (no bias) + BN + act, no pooling (the reference uses
  this stem for ImageNet too). ``stem='imagenet'``: conv7x7/2 + BN + act +
  3x3/2 *average* pool. The head is global average pooling and one dense layer.
  """
  stage_sizes: Sequence[int] = (3, 3, 3)
  stage_features: Sequence[int] = (16, 32, 64)
  stem: str = 'cifar'

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stem not in STEMS:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    layers = self.layers(train)
    if self.stem == 'cifar':
      x = layers.conv(self.stage_features[0], (3, 3), padding=1,
                      use_bias=False)(x)
    else:
      x = layers.conv(self.stage_features[0], (7, 7), 2, padding=3,
                      use_bias=False)(x)
    x = layers.act(static_input=True)(layers.norm()(x))
    if self.stem == 'imagenet':
      x = avg_pool(x, 3, 2, padding=((1, 1), (1, 1)))
    for stage, (blocks, features) in enumerate(
        zip(self.stage_sizes, self.stage_features)):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, stride, layers)(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
