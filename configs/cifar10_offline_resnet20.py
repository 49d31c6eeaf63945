"""ResNet-20 on cifar10_offline: the paper's CIFAR-10 recipe, scaled to a CPU.

cifar10_offline is the real CIFAR-10 test set re-split into 8,000 train and
2,000 test images (cos_jax/data/cifar10_offline.py), preparable without a
network: run `make cifar10-offline` once. The input pipeline treats it exactly
as CIFAR-10 (crop 32 pad 4, flip, AutoAugment CIFAR-10 policy, Cutout 16).

From `paper_config('cifar10', 'resnet20')` (SGD momentum 0.9, cosine, wd 5e-4
on every parameter, λ init 8, L = 4) only the length changes, for a 2-core
CPU: 150 epochs instead of 300, batch 64 instead of 128 (more steps on a
small training set), learning rate 0.05 instead of 0.1 (scaled with the
batch).

pretrained/cifar10_resnet20 was trained in two cosine cycles
(docs/results.md, "CIFAR-10"): this config stopped after 37 epochs (the
first run stopped there; `--config.stop_after_steps=4625` reproduces it),
then a second cycle of 45 epochs from its best checkpoint,
`--config.init_from_workdir=<the first workdir> --config.epochs=45
--config.learning_rate=0.04`.
"""

from configs import paper


def get_config():
  config = paper.paper_config('cifar10', 'resnet20')
  config.dataset = 'cifar10_offline'
  config.epochs = 150
  config.batch_size = 64
  config.learning_rate = 0.05
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 50
  return config
