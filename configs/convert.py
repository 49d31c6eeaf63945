"""Conversion config: what convert.py converts, how, and where results go.

``python convert.py`` uses this file. Every field can be set on the command
line as ``--field value`` or ``--config.field=value``, e.g.
``python convert.py --rho 4 --T 16 --init cos,half``. The settings are
checked once, before any work (cos_jax.conversion_settings.ConversionSettings).
"""

import os

import ml_collections
from ml_collections import config_dict

from cos_jax import cost, settings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # What to convert: a train.py workdir (default: the shipped small
  # Fashion-MNIST net) and which of its checkpoints, 'best' or 'latest'.
  config.workdir = os.path.join(_ROOT, 'pretrained', 'fmnist_small')
  config.checkpoint = 'best'
  # Or a PyTorch checkpoint of the COS/QCFS reference code (a .pth state_dict;
  # read without PyTorch, cos_jax.interop), which then replaces the workdir.
  # arch, num_classes and the widths come from its keys, L from a
  # '..._L<L>.pth' file name, the dataset from the number of classes (10:
  # cifar10, 100: cifar100, 1000: imagenet2012); set them where they don't.
  config.torch_checkpoint = config_dict.placeholder(str)
  config.arch = config_dict.placeholder(str)
  config.num_classes = config_dict.placeholder(int)
  config.levels = config_dict.placeholder(int)
  config.dataset = config_dict.placeholder(str)
  # Or any JAX network of the user's: 'FILE.py:NAME', NAME() returning its
  # inference function, variables, levels and thresholds (the contract is in
  # cos_jax/user_model.py; docs/byom.md), converted through cos_jax.trace.
  # The dataset then comes from `dataset`.
  config.model = config_dict.placeholder(str)

  # Calibration (cos_jax.Calibration): probe steps ρ, probe/shift rounds,
  # 'layerwise' (the paper) or 'global' (network-wide), Theorem-2 ε as a
  # fraction of the threshold, and what happens to a neuron that fired at
  # every probe step and still wants more spikes: make it 'fire' at every
  # later step (the PyTorch reference's behaviour, the default) or 'keep' it
  # (docs/semantics.md has both measured).
  config.rho = 8
  config.iterations = 1
  config.schedule = 'layerwise'
  config.epsilon = 1e-3
  config.saturated = settings.DEFAULT_SATURATED

  # Simulation: accuracy is reported at T = 1, 2, 4, ... up to T for each
  # method in `init` (comma-separated: cos, half, lightweight, zero, random,
  # and the rivals srp, pc, bc: docs/comparison.md); a method without a probe
  # also at T + ρ. srp pre-simulates τ = rho steps. pc and bc measure one
  # correction per reported T on the first calibration_examples images of
  # the training split (the authors' one batch of 128). The offset-spike analysis counts over
  # analysis_T steps (None: the model's L, the paper's T = L). time_chunk:
  # steps simulated at a time, carrying membrane potentials (same spikes;
  # bounds memory by the chunk); 0 = all steps in one block.
  config.T = 32
  config.init = 'cos,half,lightweight'
  config.analysis_T = config_dict.placeholder(int)
  config.time_chunk = 8
  config.seed = 0  # of the 'random' method
  config.calibration_examples = 128
  # Bu et al.'s delayed readout: the first readout_from steps of every run
  # are not read, so the accuracy at T is over steps readout_from+1 ..
  # readout_from+T (the latency adds readout_from; needs cost_model 'none').
  config.readout_from = 0
  # The firing rule: u >= theta (False, the COS paper) or u > theta (True,
  # Bu et al.'s code).
  config.strict = False

  # Plain-ReLU networks (docs/plain_relu.md): a workdir whose model was
  # trained with plain_relu=True, or a --model whose NAME() says 'balance':
  # True, has no trained thresholds. They are balanced per channel on the
  # training split before converting (cos_jax.balance_thresholds, Bu et al.'s
  # rule): its first balance_batches batches of balance_batch_size images,
  # in the split's order, with step balance_rate (their defaults: 12 batches
  # of 100, c = 1).
  config.balance_batches = 12
  config.balance_batch_size = 100
  config.balance_rate = 1.0

  # Cost (docs/cost.md): count every method's spikes and synaptic operations
  # and estimate the energy per image against the ANN's, per T. '45nm':
  # 45 nm CMOS, MAC 4.6 pJ, accumulate 0.9 pJ (Horowitz, ISSCC 2014); '77fj':
  # 77 fJ per synaptic operation against 12.5 pJ per MAC (the QCFS papers'
  # figures); 'none': count nothing. cost_examples: how many images are
  # counted, the first ones of the split in whole batches (0: every image).
  # Counting reruns each method on the counted batches (docs/cost.md), while
  # the cost per image settles within a few batches; the standard error over
  # the counted batches is reported with it.
  config.cost_model = cost.DEFAULT_COST_MODEL
  config.cost_examples = cost.DEFAULT_COST_EXAMPLES

  # Data: a TFDS split of the checkpoint's dataset (None: its test split),
  # optionally only its first num_examples; batch_size images per batch over
  # all devices (bounds memory); data_dir None: the TFDS default.
  config.split = config_dict.placeholder(str)
  config.num_examples = config_dict.placeholder(int)
  config.batch_size = 64
  config.data_dir = config_dict.placeholder(str)

  # Where results go (None: results/<workdir or .pth name>_rho<ρ>_T<T>).
  config.output_dir = config_dict.placeholder(str)
  return config
