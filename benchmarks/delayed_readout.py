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

import jax  # noqa: E402
import numpy as np  # noqa: E402

import cos_jax  # noqa: E402
from cos_jax import checkpoints, data  # noqa: E402
from cos_jax.data import pipeline  # noqa: E402


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
  delays = [int(d) for d in args.delays.split(',')]
  windows = [int(w) for w in args.windows.split(',')]
  correct = np.zeros((len(delays), len(windows)), np.int64)
  seen = 0
  for batch in pipeline.make_dataset(spec.name, spec.test_split,
                                     batch_size=args.eval_batch, train=False,
                                     num_examples=args.num_examples):
    outputs = np.asarray(run(variables, batch['image']))
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
        f'{args.batches}x{args.batch_size} balancing images')
  print('| delay d | ' + ' | '.join(f'T={w}' for w in windows) + ' |')
  print('|---' * (len(windows) + 1) + '|')
  for a, d in enumerate(delays):
    cells = [f'{100 * correct[a, b] / seen:.2f}' if d + w <= args.steps
             else '' for b, w in enumerate(windows)]
    print(f'| {d} | ' + ' | '.join(cells) + ' |')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'examples': seen, 'args': vars(args), 'table': table}, f,
                indent=1)


if __name__ == '__main__':
  main()
