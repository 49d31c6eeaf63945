"""ResNet-20 on CIFAR-10, the paper's settings (lr 0.1, wd 5e-4, L=4, 300 epochs)."""

from configs import paper


def get_config():
  return paper.paper_config('cifar10', 'resnet20')
