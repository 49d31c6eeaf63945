r"""The README's figure: accuracy against total latency, COS and its baselines.

Total latency is the time-steps a run takes before its prediction, the probe
steps included: T + ρ for a calibrated method (COS, lightweight), T for the
QCFS baseline (the paper's fair comparison; a streaming chip running the
layer-wise schedule needs more, docs/cost.md).

  python benchmarks/figures.py        # docs/figures/accuracy_latency.png from
                                      # docs/figures/cifar10_resnet20.json
  python benchmarks/figures.py --results results/<dir>/results.json \
      --out /tmp/accuracy_latency.png # from a convert.py run of your own

The committed JSON holds the table of docs/results.md (CIFAR-10 ResNet-20,
2,000 test images) with the commands that made it; a convert.py results.json
gives every T up to T + ρ of the methods it ran.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def curves_from_results(results: dict) -> dict:
  """The figure's curves from a convert.py results.json (accuracy in %)."""
  from cos_jax import methods  # pylint: disable=g-import-not-at-top
  rho = results['config']['rho']
  curves = {}
  for name, curve in results['curves'].items():
    method = methods.get(name)
    probes = method.probes_own_input  # reported at T + ρ
    label = f'{method.label}, ρ={rho}' if probes else method.label
    curves[label] = {'probe_steps': rho if probes else 0,
                     'T': list(range(1, len(curve) + 1)),
                     'accuracy': [100 * a for a in curve]}
  return {'ann_accuracy': 100 * results['ann_accuracy'], 'curves': curves}


def figure(data: dict, max_latency: int = 40, title: str = '') -> bytes:
  """PNG bytes: accuracy (%) against T + probe steps, log-2 latency axis."""
  import io  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for label, curve in data['curves'].items():
    points = sorted({t + curve['probe_steps']: a for t, a in
                     zip(curve['T'], curve['accuracy'])
                     if t + curve['probe_steps'] <= max_latency}.items())
    latency, accuracy = zip(*points)
    ax.plot(latency, accuracy, marker='o', ms=4, label=label)
  ax.axhline(data['ann_accuracy'], color='k', lw=1, ls=':', label='ANN (QCFS)')
  ax.set_xscale('log', base=2)
  ticks = [2**k for k in range(max_latency.bit_length()) if 2**k <= max_latency]
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.set_xlabel('total latency: time-steps including the ρ probe steps')
  ax.set_ylabel('accuracy (%)')
  ax.set_title(title or 'accuracy against total latency')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='lower right')
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, bbox_inches='tight',
              metadata={'Software': None})
  plt.close(fig)
  return buf.getvalue()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default=os.path.join(
      ROOT, 'docs', 'figures', 'cifar10_resnet20.json'),
                      help='Curves as in docs/figures/cifar10_resnet20.json.')
  parser.add_argument('--results', help='A convert.py results.json to plot '
                      'instead of --data.')
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'docs', 'figures', 'accuracy_latency.png'),
                      help='The PNG to write.')
  parser.add_argument('--max_latency', type=int, default=40,
                      help='Right end of the latency axis.')
  args = parser.parse_args(argv)
  path = args.results or args.data
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  if args.results:
    data = curves_from_results(data)
  png = figure(data, args.max_latency, data.get('title', ''))
  with open(args.out, 'wb') as f:
    f.write(png)
  print(f'wrote {args.out} from {path}')


if __name__ == '__main__':
  main()
