r"""What one time-step can do: the ANN with some QCFS layers binarised.

Not a speed benchmark; the accuracy analysis behind the T = 1 section of
docs/results.md. From v(0) = θ/2 an IF neuron fires at step 1 iff its input
is at least θ/2, which is QCFS with L = 1. So this prints, on the test split:

* the ANN's accuracy, and with each activation layer alone binarised (L = 1),
  then all but the first, then all of them;
* the SNN at T = 1 from θ/2 (equal to the all-binarised ANN);
* the share of each layer's neurons whose v(0) COS shifts, on the first batch
  (the first layer sees a constant input and is never shifted).

  python benchmarks/binarised_ann.py                       # the shipped model
  python benchmarks/binarised_ann.py --workdir runs/wide --rho 8
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string(
    'workdir', os.path.join(ROOT, 'pretrained', 'fmnist_small'),
    'A train.py workdir.')
_RHO = flags.DEFINE_integer('rho', 8, 'Probe steps of the COS shift count.')
_BATCH = flags.DEFINE_integer('batch_size', 1000, 'Evaluation batch size.')


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax/TFDS chatter
  from cos_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.use_all_host_cores()
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import cos_jax  # pylint: disable=g-import-not-at-top
  from cos_jax import checkpoints, data, neuron  # pylint: disable=g-import-not-at-top
  from cos_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config, model, variables = checkpoints.load_checkpoint(_WORKDIR.value)
  variables = {k: variables[k] for k in ('params', 'batch_stats')}
  batches = list(pipeline.make_dataset(config.dataset,
                                   data.dataset_info(config.dataset).test_split,
                                   batch_size=_BATCH.value, train=False))
  names = list(cos_jax.init_v0(model, variables, batches[0]['image'][:1]))

  def binarised_ann(layers):
    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if (isinstance(module, cos_jax.Activation)
          and context.method_name == '__call__' and module.name in layers):
        return neuron.qcfs(args[0], module.variables['params']['threshold'], 1)
      return next_fun(*args, **kwargs)

    @jax.jit
    def predict(images):
      with nn.intercept_methods(interceptor):
        return model.apply(variables, images).argmax(-1)
    return predict

  def accuracy(predict):
    correct = sum(int(np.sum(np.asarray(predict(b['image'])) == b['label']))
                  for b in batches)
    return 100 * correct / sum(len(b['label']) for b in batches)

  print(f'{_WORKDIR.value}: {config.model}, L={config.levels}, '
        f'{config.dataset} test')
  rows = [('ANN', ())] + [(f'ANN, {n} binarised', (n,)) for n in names]
  rows += [('ANN, all but the first binarised', tuple(names[1:])),
           ('ANN, all binarised', tuple(names))]
  for label, layers in rows:
    print(f'  {label:40s} {accuracy(binarised_ann(layers)):6.2f} %')
  snn_t1 = jax.jit(lambda x: cos_jax.simulate(model, variables, x,
                                                T=1)[0].argmax(-1))
  print(f'  {"SNN at T=1 from θ/2":40s} {accuracy(snn_t1):6.2f} %')

  images = jnp.asarray(batches[0]['image'])
  half = cos_jax.init_v0(model, variables, images)
  shifted = cos_jax.calibrate(model, variables, images, rho=_RHO.value)
  print(f'COS (rho={_RHO.value}) shifts, first batch of {len(images)}:')
  for n in names:
    share = float(jnp.mean(shifted[n]['v0'] != half[n]['v0']))
    print(f'  {n:20s} {100 * share:6.2f} % of neurons')


if __name__ == '__main__':
  app.run(main)
