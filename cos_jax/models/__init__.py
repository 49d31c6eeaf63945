"""Model zoo: every ReLU is an :class:`~cos_jax.activation.Activation` slot.

``get(name, num_classes=..., levels=...)`` builds any model; the same module with
``spiking=SpikingConfig(...)`` (see :func:`cos_jax.snn.spiking`) is the IF network
over the same variables.
"""

from __future__ import annotations

import functools
import numbers

import flax.linen as nn

from cos_jax.models.resnet import STEMS, BasicBlock, ResNet
from cos_jax.models.small import SmallNet
from cos_jax.models.vgg import VGG, VGG16_BLOCKS

_REGISTRY = {
    'small': SmallNet,
    'vgg16': functools.partial(VGG, blocks=VGG16_BLOCKS),
    'resnet18': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                                  stage_features=(64, 128, 256, 512)),
    'resnet20': functools.partial(ResNet, stage_sizes=(3, 3, 3),
                                  stage_features=(16, 32, 64)),
    'resnet34': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                                  stage_features=(64, 128, 256, 512)),
}

NAMES = tuple(_REGISTRY)


def get(name: str, *, num_classes: int, levels: int, **kwargs) -> nn.Module:
  """Builds a model of the zoo.

  Args:
    name: one of ``NAMES``: 'small', 'vgg16', 'resnet18', 'resnet20', 'resnet34'.
    num_classes: classifier outputs.
    levels: QCFS quantisation levels L (positive int).
    **kwargs: model attributes, e.g. ``stem='imagenet'`` for ResNets,
      ``threshold_init``, ``stages`` for the small net.

  Returns:
    A linen module; ``model.apply(variables, images, train=False)`` gives logits.

  Example:
    >>> net = cos_jax.models.get('resnet20', num_classes=10, levels=4)
    >>> shapes = jax.eval_shape(net.init, jax.random.key(0),
    ...                         jnp.zeros((1, 32, 32, 3)))
    >>> sorted(shapes), shapes['params']['Activation_0']['threshold'].shape
    (['batch_stats', 'params'], ())
  """
  if name not in _REGISTRY:
    raise ValueError(f'unknown architecture {name!r}; choose one of '
                     f'{", ".join(NAMES)}')
  for field, value in (('num_classes', num_classes), ('levels', levels)):
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
        or value <= 0):
      raise ValueError(f'{field} must be a positive integer, got {value!r}')
  num_classes, levels = int(num_classes), int(levels)
  if name == 'small':
    kwargs.pop('stem', None)  # the small net has a single 28x28/32x32 layout
  return _REGISTRY[name](num_classes=num_classes, levels=levels, **kwargs)
