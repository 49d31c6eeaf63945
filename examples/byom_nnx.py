r"""Bring your own model: an NNX CNN trained with QCFS, converted to an SNN.

  python examples/byom_nnx.py                    # ~2-3 min on 2 CPU cores
  python examples/byom_nnx.py --steps 3000 --channels 32,64
  python convert.py --model examples/byom_nnx.py:model --dataset fashion_mnist

The first run also saves the trained network to --save (runs/byom_nnx); the
function ``model()`` below reads it back (or from $BYOM_NNX_DIR), which is what
``convert.py --model`` calls: the same table, files, plots and energy figures
as for a zoo network.

Trains a small Flax NNX CNN (conv-BatchNorm-ReLU-avg-pool twice, a dense head),
written the usual NNX way with ``nnx.relu``, on Fashion-MNIST in a plain optax
loop. ``cos_jax.with_qcfs`` makes every ReLU a QCFS activation with a trainable
threshold; ``cos_jax.trace`` turns the inference function into the QCFS ANN and
the IF SNN; ``cos_jax.evaluate_snn`` calibrates offset spikes (COS) and runs
the SNN. Prints the test accuracy of the ANN and of the SNN at each T, with COS
and with the θ/2 baseline. Needs the IDX files of Debian's
dataset-fashion-mnist (see docs/byom.md).
"""

import argparse
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx, serialization  # noqa: E402

import cos_jax  # noqa: E402


def load(folder, split, n):
  """The first n images [n, 28, 28, 1] (normalised) and labels of a split."""
  paths = [os.path.join(folder, f'{split}-{kind}-idx{d}-ubyte.gz')
           for kind, d in (('images', 3), ('labels', 1))]
  if not all(os.path.exists(p) for p in paths):
    sys.exit(f'no Fashion-MNIST in {folder}: apt-get install '
             'dataset-fashion-mnist')
  with gzip.open(paths[0]) as f:
    x = np.frombuffer(f.read(16 + n * 784)[16:], np.uint8)
  with gzip.open(paths[1]) as f:
    y = np.frombuffer(f.read(8 + n)[8:], np.uint8).astype(np.int32)
  x = x.reshape(-1, 28, 28, 1)
  return ((x / 255 - 0.286) / 0.353).astype(np.float32), y


class CNN(nnx.Module):
  def __init__(self, channels, rngs):
    c1, c2 = channels
    self.conv1, self.bn1 = nnx.Conv(1, c1, (3, 3), rngs=rngs), nnx.BatchNorm(c1, rngs=rngs)
    self.conv2, self.bn2 = nnx.Conv(c1, c2, (3, 3), rngs=rngs), nnx.BatchNorm(c2, rngs=rngs)
    self.head = nnx.Linear(c2 * 7 * 7, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.bn1(self.conv1(x))), (2, 2), (2, 2))
    x = nnx.avg_pool(nnx.relu(self.bn2(self.conv2(x))), (2, 2), (2, 2))
    return self.head(x.reshape(len(x), -1))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(ROOT, 'runs', 'byom_nnx')


def split(channels, levels=4):
  """(graphdef, params, stats) of a fresh CNN, and its inference function."""
  graphdef, params, stats = nnx.split(CNN(channels, nnx.Rngs(0)), nnx.Param,
                                      nnx.BatchStat)

  def inference(variables, x):  # BatchNorm on the running statistics
    model = nnx.merge(graphdef, *variables)
    model.eval()
    return model(x)

  return graphdef, params, stats, inference


def save(folder, channels, levels, params, stats, thresholds):
  """The trained network as folder/network.msgpack (+ network.json)."""
  os.makedirs(folder, exist_ok=True)
  tree = {'params': nnx.to_pure_dict(params),
          'stats': nnx.to_pure_dict(stats),
          'thresholds': dict(thresholds)}
  data = serialization.msgpack_serialize(jax.tree.map(np.asarray, tree))
  path = os.path.join(folder, 'network.msgpack')
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)  # a kill leaves the old file or the new
  with open(os.path.join(folder, 'network.json'), 'w') as f:
    json.dump({'channels': list(channels), 'levels': levels}, f)


def model():
  """What ``convert.py --model examples/byom_nnx.py:model`` converts: the
  network saved by this script (cos_jax/user_model.py has the contract)."""
  folder = os.environ.get('BYOM_NNX_DIR', SAVED)
  if not os.path.exists(os.path.join(folder, 'network.msgpack')):
    raise FileNotFoundError(f'no trained network in {folder}: run '
                            'python examples/byom_nnx.py first')
  with open(os.path.join(folder, 'network.json')) as f:
    meta = json.load(f)
  with open(os.path.join(folder, 'network.msgpack'), 'rb') as f:
    saved = serialization.msgpack_restore(f.read())
  _, params, stats, inference = split(meta['channels'])
  nnx.replace_by_pure_dict(params, saved['params'])
  nnx.replace_by_pure_dict(stats, saved['stats'])
  return {'fn': inference, 'variables': (params, stats),
          'levels': meta['levels'], 'thresholds': saved['thresholds']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', default='/usr/share/datasets/fashion-mnist')
  parser.add_argument('--channels', default='16,32')
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--levels', type=int, default=4, help='QCFS L')
  parser.add_argument('--threshold_init', type=float, default=4.0)
  parser.add_argument('--rho', type=int, default=4, help='COS probe steps')
  parser.add_argument('--T', default='1,2,4,8')
  parser.add_argument('--test_images', type=int, default=10_000)
  parser.add_argument('--save', default=SAVED,
                      help='where the trained network goes (for convert.py '
                      '--model examples/byom_nnx.py:model)')
  args = parser.parse_args()
  Ts = [int(t) for t in args.T.split(',')]
  start = time.time()

  x_train, y_train = load(args.data, 'train', 60_000)
  x_test, y_test = load(args.data, 't10k', args.test_images)
  channels = [int(c) for c in args.channels.split(',')]
  graphdef, params, stats, inference = split(channels)

  def train_forward(params, stats, x):  # BatchNorm on batch statistics
    model = nnx.merge(graphdef, params, stats)
    model.train()
    return model(x), nnx.state(model, nnx.BatchStat)

  qfn = cos_jax.with_qcfs(train_forward, levels=args.levels)
  thresholds = qfn.init(params, stats, x_train[:1],
                        threshold_init=args.threshold_init)
  opt = optax.sgd(optax.cosine_decay_schedule(args.lr, args.steps),
                  momentum=0.9)
  opt_state = opt.init((params, thresholds))

  @jax.jit
  def step(trainable, stats, opt_state, x, y):
    def loss(trainable):
      params, thresholds = trainable
      logits, new_stats = qfn(thresholds, params, stats, x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), new_stats
    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), stats, opt_state, value

  trainable = (params, thresholds)
  rng = np.random.default_rng(0)
  for i in range(args.steps):
    batch = rng.integers(0, len(x_train), args.batch)
    trainable, stats, opt_state, value = step(
        trainable, stats, opt_state, x_train[batch], y_train[batch])
    if (i + 1) % max(1, args.steps // 5) == 0:
      print(f'step {i + 1}: loss {float(value):.3f}')
  params, thresholds = trainable
  save(args.save, channels, args.levels, params, stats, thresholds)
  print(f'trained in {time.time() - start:.0f} s; thresholds',
        {s: round(float(t), 3) for s, t in thresholds.items()})

  net, net_vars = cos_jax.trace(inference, (params, stats), x_test[:500],
                                levels=args.levels, thresholds=thresholds)
  batches = range(0, len(x_test), 500)  # the SNN in batches of 500 images
  ann = sum(int((net.apply(net_vars, x_test[b:b + 500]).argmax(-1) ==
                 y_test[b:b + 500]).sum()) for b in batches)
  print(f'sites {list(net.sites)}; {len(x_test)} test images; QCFS ANN '
        f'(L={args.levels}) {100 * ann / len(x_test):.2f}%')
  print(f'{"v0":<6}' + ''.join(f'{f"T={T}":>9}' for T in Ts))
  for init in ('cos', 'half'):
    correct = np.zeros(max(Ts))
    for b in batches:
      outputs = cos_jax.evaluate_snn(net, net_vars, x_test[b:b + 500],
                                     T=max(Ts), init=init, rho=args.rho).outputs
      predictions = jnp.cumsum(outputs, 0).argmax(-1)  # mean of outputs[:t]
      correct += np.asarray((predictions == y_test[b:b + 500]).sum(1))
    print(f'{init:<6}' + ''.join(
        f'{100 * correct[T - 1] / len(x_test):>8.2f}%' for T in Ts))
  print(f'total {time.time() - start:.0f} s')


if __name__ == '__main__':
  main()
