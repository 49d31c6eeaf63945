"""Bu et al.'s T-vs-delay table of a plain-ReLU workdir, from one run.

The thresholds are balanced as ``convert.py`` balances them (the first
``--batches`` batches of ``--batch_size`` training images, in order); the
SNN then runs ``--steps`` steps from v(0) = θ/2 on the test split, and the
accuracy of every readout window [d+1, d+T] is read off the same outputs, as
their ``utils.snn_inference`` does (its ``tot[i, j]``). ``convert.py
--readout_from d`` gives one row of it (docs/plain_relu.md).

  python benchmarks/delayed_readout.py --workdir pretrained/fmnist_small_relu
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import cos_jax  # noqa: E402
from cos_jax import checkpoints, data  # noqa: E402
from cos_jax.activation import Activation  # noqa: E402
from cos_jax.data import pipeline  # noqa: E402


def _clipped(next_fun, args, kwargs, context):
  """Every slot as the ReLU clipped at its threshold (the authors' 'clip'
  mode: the ANN the SNN approaches as T grows)."""
  module = context.module
  if isinstance(module, Activation) and context.method_name == '__call__':
    theta = module.get_variable('params', 'threshold')
    return theta - jax.nn.relu(theta - jax.nn.relu(args[0]))
  return next_fun(*args, **kwargs)


def clipped_logits(model, variables, images):
  with nn.intercept_methods(_clipped):
    return model.apply(variables, images, train=False)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--delays', default='0,1,2,4,8')
  parser.add_argument('--windows', default='1,2,4,8,16,32')
  parser.add_argument('--init', default='half')
  parser.add_argument('--rho', type=int, default=4)
  parser.add_argument('--strict', action='store_true')
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--batch_size', type=int, default=100)
  parser.add_argument('--eval_batch', type=int, default=250)
  parser.add_argument('--num_examples', type=int, default=None)
  parser.add_argument('--out', default=None, help='a JSON file of the table')
  args = parser.parse_args()

  restored = checkpoints.restore(args.workdir)
  spec = data.dataset_info(restored.config.dataset)
  model = restored.model.clone(strict=args.strict)
  train = pipeline.make_dataset(spec.name, spec.train_split,
                                batch_size=args.batch_size, train=False,
                                shard_index=0, num_shards=1,
                                drop_remainder=False)
  variables = cos_jax.balance_thresholds(
      model, restored.variables, (b['image'] for b in train),
      num_batches=args.batches)
  run = jax.jit(lambda v, x: cos_jax.evaluate_snn(
      model, v, x, T=args.steps, init=args.init,
      rho=args.rho).outputs)
  ann = jax.jit(lambda v, x: (model.apply(v, x, train=False).argmax(-1),
                              clipped_logits(model, v, x).argmax(-1)))
  ann_correct = np.zeros(2, np.int64)
  delays = [int(d) for d in args.delays.split(',')]
  windows = [int(w) for w in args.windows.split(',')]
  correct = np.zeros((len(delays), len(windows)), np.int64)
  seen = 0
  for batch in pipeline.make_dataset(spec.name, spec.test_split,
                                     batch_size=args.eval_batch, train=False,
                                     num_examples=args.num_examples):
    outputs = np.asarray(run(variables, batch['image']))
    ann_correct += [np.sum(np.asarray(p) == batch['label'])
                    for p in ann(variables, batch['image'])]
    for a, d in enumerate(delays):
      summed = np.cumsum(outputs[d:], 0)
      for b, w in enumerate(windows):
        if d + w <= args.steps:
          correct[a, b] += np.sum(summed[w - 1].argmax(-1) == batch['label'])
    seen += len(batch['label'])
  table = {f'delay {d}': {f'T={w}': (100 * correct[a, b] / seen
                                     if d + w <= args.steps else None)
                          for b, w in enumerate(windows)}
           for a, d in enumerate(delays)}
  print(f'{seen} images, init={args.init}, strict={args.strict}, '
        f'{args.batches}x{args.batch_size} balancing images; ANN (ReLU) '
        f'{100 * ann_correct[0] / seen:.2f}%, ANN clipped at the balanced '
        f'thresholds {100 * ann_correct[1] / seen:.2f}%')
  print('| delay d | ' + ' | '.join(f'T={w}' for w in windows) + ' |')
  print('|---' * (len(windows) + 1) + '|')
  for a, d in enumerate(delays):
    cells = [f'{100 * correct[a, b] / seen:.2f}' if d + w <= args.steps
             else '' for b, w in enumerate(windows)]
    print(f'| {d} | ' + ' | '.join(cells) + ' |')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'examples': seen, 'args': vars(args), 'table': table,
                 'ann_relu': ann_correct[0] / seen,
                 'ann_clipped': ann_correct[1] / seen}, f, indent=1)


if __name__ == '__main__':
  main()
