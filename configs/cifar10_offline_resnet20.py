"""ResNet-20 on cifar10_offline with the paper's CIFAR-10 recipe.

cifar10_offline is the real CIFAR-10 test set re-split into 8,000 train and
2,000 test images (cos_jax/data/cifar10_offline.py), preparable without a
network: run `make cifar10-offline` once. The recipe is
`paper_config('cifar10', 'resnet20')` unchanged (SGD momentum 0.9, cosine,
lr 0.1, wd 5e-4, λ init 8, L=4, batch 128, 300 epochs); only the dataset
differs, and the input pipeline treats it exactly as CIFAR-10.
"""

from configs import paper


def get_config():
  config = paper.paper_config('cifar10', 'resnet20')
  config.dataset = 'cifar10_offline'
  return config
