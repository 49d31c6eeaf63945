"""A conversion's figures, as PNG bytes: accuracy against T and against
total latency, the offset spikes per layer, accuracy against energy.

Each reads the dict :func:`cos_jax.conversion.convert_and_evaluate` returns
(or the same dict read back from results.json); :func:`cos_jax.report.
write_results` writes them.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from cos_jax import analysis, report  # pylint: disable=g-import-not-at-top
from cos_jax.conversion_settings import ConversionSettings  # pylint: disable=g-import-not-at-top


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120, bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


def _points(curve: list, steps) -> tuple[list[int], list[float]]:
  """(t, accuracy %) for the t in ``steps`` the curve has a value at."""
  kept = [t for t in steps if report.at(curve, t) is not None]
  return kept, [100 * curve[t - 1] for t in kept]


def accuracy_figure(result: dict, settings: ConversionSettings) -> bytes:
  """PNG, two panels. Left: accuracy against T, each method at its own
  accounting (a method without a probe also at T + ρ, dashed: its accuracy
  at T + ρ plotted at T, the paper's comparison). Right: accuracy against
  the total latency, probe and pre-simulation steps included."""
  T, layers = settings.T, report.depth(result)
  fig, (own, total) = plt.subplots(1, 2, figsize=(12, 4.2))
  for method in settings.methods:
    curve = result['curves'][method.name]
    t, y = _points(curve, range(1, T + 1))
    line, = own.plot(t, y, marker='.', label=method.display())
    for shift in method.shifts()[1:]:
      t2, y2 = _points(curve, range(1 + shift, T + shift + 1))
      own.plot([i - shift for i in t2], y2, ls='--', color=line.get_color(),
               label=f'{method.display()} at T+ρ')
    # Every t it ran, T + ρ included: the latency axis puts them in place.
    t, y = _points(curve, range(1, len(curve) + 1))
    total.plot([method.latency(i, layers) for i in t], y, marker='.',
               color=line.get_color(), label=method.display())
  for ax, xlabel in ((own, 'time-steps T (each method\'s own accounting)'),
                     (total, 'total latency (probe / pre-simulation steps '
                      'included)')):
    ax.axhline(100 * result['ann_accuracy'], color='k', lw=1, ls=':',
               label='ANN')
    ax.set_xscale('log', base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('accuracy (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  own.set_title(f'accuracy vs T ({result["examples"]} examples)')
  total.set_title('accuracy vs total latency')
  return _png(fig)


def offset_spike_figure(result: dict) -> bytes:
  """PNG: per-layer distribution of ψ before / after calibration (Fig. 3).

  One panel per offset value ψ ≠ 0 would be unreadable; instead each layer
  gets a pair of stacked bars (before, after) showing the share of neurons
  with ψ = -k..k, ψ = 0 left out (it is 1 - the bar's height).
  """
  before, after = result['layers']['before'], result['layers']['after']
  names = list(before)
  offsets = [b for b in analysis.OFFSET_BINS if b != 0]
  colors = plt.cm.coolwarm(np.linspace(0, 1, len(offsets)))
  fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4.2))
  x = np.arange(len(names))
  tallest = 0.0
  for shift, (stats, hatch) in enumerate(((before, ''), (after, '//'))):
    # int(ψ) keys in-process, str keys once results.json is read back.
    histograms = [{int(k): v for k, v in stats[n]['histogram'].items()}
                  for n in names]
    bottom = np.zeros(len(names))
    for offset, color in zip(offsets, colors):
      share = 100 * np.array([h[offset] for h in histograms])
      ax.bar(x + (shift - 0.5) * 0.38, share, 0.36, bottom=bottom,
             color=color, hatch=hatch, edgecolor='k', linewidth=0.3,
             label=f'ψ={offset:+d}' if shift == 0 else None)
      bottom += share
    tallest = max(tallest, bottom.max(initial=0))
  # Headroom for the legend; an all-zero plot still gets a visible axis.
  ax.set_ylim(0, 1.25 * tallest if tallest > 0 else 1)
  ax.set_xticks(x, [f'L{i + 1}' for i in range(len(names))])
  ax.set_ylabel('neurons with ψ ≠ 0 (%)')
  ax.set_title(f'offset spikes per layer over T={result["analysis_T"]}: '
               'left bar before, right (hatched) after calibration')
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3, axis='y')
  return _png(fig)


def accuracy_energy_figure(result: dict, settings: ConversionSettings
                           ) -> bytes:
  """PNG: accuracy against energy per image relative to the ANN (as
  deployed), one curve per method through T = 1, 2, 4, ... (and T + ρ for
  a method without a probe), the ANN at (1, its accuracy)."""
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  if 'cost' not in result:
    ax.text(0.5, 0.5, 'no costs counted (cost_model none)', ha='center')
    return _png(fig)
  for method in settings.methods:
    curve = result['curves'][method.name]
    steps = sorted({t + s for t in report.report_steps(settings.T)
                    for s in method.shifts()})
    steps, y = _points(curve, steps)
    energy = result['cost']['methods'][method.name]['deployment'][
        'relative_energy']
    x = [energy[t - 1] for t in steps]
    ax.plot(x, y, marker='o', ms=3, label=method.display())
    for t, xi, yi in zip(steps, x, y):
      ax.annotate(str(t), (xi, yi), fontsize=6, xytext=(2, 2),
                  textcoords='offset points')
  ax.plot([1.0], [100 * result['ann_accuracy']], 'k*', ms=10, label='ANN')
  ax.set_xscale('log')
  ax.set_xlabel('energy per image / ANN (deployed; points labelled by T)')
  ax.set_ylabel('accuracy (%)')
  ax.set_title(f'accuracy vs energy ({result["cost"]["cost_model"]["name"]}, '
               f'{result["examples"]} examples)')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  return _png(fig)
