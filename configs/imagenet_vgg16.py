"""VGG-16 on ImageNet, the paper's settings (lr 0.1, wd 1e-4, L=8, batch 256, 300 epochs).

L=16 is the paper's other ImageNet setting: --config.levels=16.
"""

from configs import paper


def get_config():
  return paper.paper_config('imagenet2012', 'vgg16')
