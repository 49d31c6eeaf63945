"""What every zoo network shares: its attributes and its layer factories.

A network builds its layers from three factories (the shape of Flax's
``examples/imagenet/models.py``): ``conv`` (Kaiming fan-out init, as the
reference; computed by :func:`cos_jax.conv.conv_general_dilated`, which picks
per layer shape the form that is fast on the backend), ``norm`` (BatchNorm
with PyTorch's momentum and ε) and ``act`` (the
:class:`~cos_jax.activation.Activation` slot, a QCFS ANN or IF neurons by the
network's ``spiking``). Blocks receive them, so a change to one kind of layer
happens here, once, for every model and for the ANN and the SNN alike.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn

from cos_jax import conv as conv_lib
from cos_jax.activation import Activation, SpikingConfig

# Kaiming-normal with fan_out, as the reference initialises convolutions.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Layers(NamedTuple):
  """Layer factories: ``conv(features, kernel_size, ...)``, ``norm()``,
  ``act(static_input=False)``."""
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  act: Callable[..., nn.Module]


class QCFSNet(nn.Module):
  """Base of the zoo: a classifier whose ReLUs are Activation slots.

  Attributes:
    num_classes: classifier outputs.
    levels: L, the QCFS quantisation levels of every activation.
    spiking: ``None`` for the QCFS ANN, else the IF network's pass settings.
    threshold_init: initial λ = θ of every activation (the reference: 8.0).
    conv_impl: 'auto' (each conv picks its fastest exact form on the backend,
      :mod:`cos_jax.conv`) or 'lax' (always ``lax.conv_general_dilated``, for
      comparisons). The parameters are the same either way.
    plain_relu: every slot is a plain ReLU in the ANN (a network trained
      without QCFS; its SNN thresholds come from balancing).
    per_channel: slots create one threshold per channel (given variables
      decide by their own shapes; :class:`~cos_jax.activation.Activation`).
    strict: IF neurons fire on ``u > θ`` (Bu et al.) instead of ``u ≥ θ``.
  """
  num_classes: int = 10
  levels: int = 4
  spiking: SpikingConfig | None = None
  threshold_init: float = 8.0
  conv_impl: str = 'auto'
  plain_relu: bool = False
  per_channel: bool = False
  strict: bool = False

  def layers(self, train: bool) -> Layers:
    return Layers(
        conv=functools.partial(
            nn.Conv, kernel_init=conv_init,
            conv_general_dilated=conv_lib.implementation(self.conv_impl)),
        # PyTorch BatchNorm2d defaults: momentum 0.1 (= flax 0.9), eps 1e-5.
        norm=functools.partial(nn.BatchNorm, use_running_average=not train,
                               momentum=0.9, epsilon=1e-5),
        act=functools.partial(Activation, self.levels, self.spiking,
                              threshold_init=self.threshold_init,
                              plain_relu=self.plain_relu,
                              per_channel=self.per_channel,
                              strict=self.strict))


def avg_pool(x, size: int = 2, stride: int | None = None, padding='VALID'):
  # Average (not max) pooling: linear, so it commutes with the time folding
  # and keeps the ANN and SNN layers equivalent.
  stride = stride or size
  return nn.avg_pool(x, (size, size), (stride, stride), padding=padding)


def conv_bn_act_blocks(x, blocks, layers: Layers):
  """VGG-style features: per block, conv3x3(bias)-BN-act layers, then a 2x2
  average pool. The very first activation is marked ``static_input`` (its
  input is the image through one linear layer, the same at every step)."""
  first = True
  for block in blocks:
    for features in block:
      x = layers.conv(features, (3, 3), padding=1)(x)
      x = layers.norm()(x)
      x = layers.act(static_input=first)(x)
      first = False
    x = avg_pool(x)
  return x
