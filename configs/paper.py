"""The paper's training recipe (COS, ICLR 2023, and its reference code).

SGD momentum 0.9, cosine schedule over 300 epochs, coupled weight decay on all
parameters; CIFAR-10 lr 0.1, CIFAR-100 lr 0.02, wd 5e-4, L=4, batch 128;
ImageNet lr 0.1, wd 1e-4, L=8 (16 is the paper's other setting), batch 256.
The per-(dataset, architecture) files in this directory call `paper_config`.
"""

import ml_collections

from configs import default

_DATASET = {
    # dataset: (learning_rate, weight_decay, levels, batch_size, stem)
    'cifar10': (0.1, 5e-4, 4, 128, 'cifar'),
    'cifar100': (0.02, 5e-4, 4, 128, 'cifar'),
    'imagenet2012': (0.1, 1e-4, 8, 256, 'cifar'),
}


def paper_config(dataset: str, model: str) -> ml_collections.ConfigDict:
  config = default.get_config()
  lr, wd, levels, batch, stem = _DATASET[dataset]
  config.dataset = dataset
  config.model = model
  config.model_kwargs = ml_collections.ConfigDict()  # the zoo's defaults
  config.levels = levels
  # The reference code trains its ResNets on ImageNet with the CIFAR stem
  # (conv3x3, no max-pool); set --config.stem=imagenet for the 7x7/2 stem.
  config.stem = stem
  config.batch_size = batch
  config.eval_batch_size = 500 if dataset == 'imagenet2012' else 1000
  config.epochs = 300
  config.learning_rate = lr
  config.weight_decay = wd
  config.momentum = 0.9
  config.checkpoint_every_steps = 2000
  config.log_every_steps = 100
  return config
