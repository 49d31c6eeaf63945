"""The small default net trained with plain ReLU instead of QCFS (the recipe of
pretrained/fmnist_small otherwise): a source network for training-free
conversion, whose SNN thresholds come from balancing, not from training.

  python train.py --workdir runs/fmnist_relu --config configs/fmnist_small_relu.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model_kwargs.plain_relu = True
  return config
