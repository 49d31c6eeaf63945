"""Layers shared by the model zoo: conv/BN initialisers matching the reference."""

from __future__ import annotations

import functools

import flax.linen as nn

# Kaiming-normal with fan_out, as the reference initialises convolutions.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train: bool):
  # PyTorch BatchNorm2d defaults: momentum 0.1 (= flax 0.9), eps 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5)


conv3x3 = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1,
                            kernel_init=conv_init)


def avg_pool(x, size: int = 2, stride: int | None = None, padding='VALID'):
  # Average (not max) pooling: linear, so it commutes with the time folding
  # and keeps the ANN and SNN layers equivalent.
  stride = stride or size
  return nn.avg_pool(x, (size, size), (stride, stride), padding=padding)


def conv_bn_act_blocks(x, blocks, *, levels, spiking, threshold_init, train,
                       conv_bias: bool):
  """VGG-style feature extractor: per block, conv3x3-BN-act layers then a 2x2
  average pool. The very first activation is marked static_input (its input
  is the image through one linear layer, the same at every time-step)."""
  from cos_jax.activation import Activation  # pylint: disable=g-import-not-at-top
  first = True
  for block in blocks:
    for features in block:
      x = conv3x3(features, use_bias=conv_bias)(x)
      x = batch_norm(train)(x)
      x = Activation(levels, spiking, static_input=first,
                     threshold_init=threshold_init)(x)
      first = False
    x = avg_pool(x)
  return x
