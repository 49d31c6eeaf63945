"""Default config: the small QCFS net (L=4) on Fashion-MNIST, sized for a CPU.

``python train.py --workdir runs/fmnist`` uses this file. Every other config in
this directory starts from it and overrides the paper's settings, so the set of
fields is defined here once. Override any field on the command line, e.g.
``--config.epochs=3 --config.num_train_examples=2048``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data (cos_jax.data): one of 'fashion_mnist', 'cifar10', 'cifar100',
  # 'imagenet2012'. num_*_examples=None uses the whole split (set them for
  # quick runs); data_dir=None uses the TFDS default directory.
  config.dataset = 'fashion_mnist'
  config.data_dir = config_dict.placeholder(str)
  config.num_train_examples = config_dict.placeholder(int)
  config.num_test_examples = config_dict.placeholder(int)
  # The data order is cut into this many shards (None: one per process; it
  # must be a multiple of the process count). Runs with the same data_shards
  # see the same batches whatever their number of processes and devices
  # (cos_jax/train_input.py); the value used is recorded in config.json.
  config.data_shards = config_dict.placeholder(int)

  # Model (cos_jax.models.get): QCFS ANN with L = `levels` quantisation levels.
  # `stem` matters for ResNets only ('cifar' | 'imagenet'); `model_kwargs`
  # are passed on to the model (e.g. `stages`, `hidden` of the small net).
  config.model = 'small'
  config.levels = 4
  config.stem = 'cifar'
  # The CPU default: a narrower SmallNet than its class default (16/32/64-64
  # instead of 32/64-64/128 channels, ~4x fewer MACs) and a lower initial
  # threshold λ (2 instead of the reference's 8, which wastes the first epochs
  # while λ shrinks). The paper configs reset model_kwargs to {}.
  config.model_kwargs = ml_collections.ConfigDict({
      'stages': ((16,), (32,), (64, 64)),
      'hidden': 256,
      'threshold_init': 2.0,
  })

  # Optimisation: SGD + momentum, cosine decay of the learning rate over all
  # steps, coupled weight decay (added to the gradient, as torch.optim.SGD's
  # weight_decay) on every parameter, thresholds λ and BN included.
  config.batch_size = 64           # global; split over all devices
  config.eval_batch_size = 1000    # global; the last batch is padded + masked
  config.epochs = 12
  config.learning_rate = 0.05
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.seed = 0

  # Fine-tuning: start from a PyTorch checkpoint of the COS/QCFS reference
  # code (a .pth state_dict of this model, dataset and L; its weights, BN
  # statistics and thresholds; the optimizer starts fresh). Only for a new run.
  config.init_from_torch = config_dict.placeholder(str)
  # Or from the best checkpoint of another train.py workdir of this model
  # (e.g. a second cosine cycle); the optimizer starts fresh.
  config.init_from_workdir = config_dict.placeholder(str)

  # Bookkeeping. Checkpoints are also written at the end of every epoch.
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.async_checkpointing = True
  # Stop (with a checkpoint) once this global step is reached; None = train
  # to the end. A rerun with the same workdir resumes from there.
  config.stop_after_steps = config_dict.placeholder(int)
  return config
