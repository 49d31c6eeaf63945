"""PNG figures of a conversion run (matplotlib, headless)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from cos_jax import analysis  # pylint: disable=g-import-not-at-top


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120, bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


def accuracy_vs_time(result: dict, settings) -> bytes:
  """Accuracy against time-steps T for every method (log-2 T axis).

  Uncalibrated methods are drawn twice: at T (solid) and shifted by ρ (dashed,
  their accuracy at T+ρ plotted at T), the paper's fair comparison.
  """
  from cos_jax.conversion import CALIBRATED, METHOD_LABELS  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  steps = np.arange(1, settings.T + 1)
  for init, curve in result['curves'].items():
    curve = 100 * np.asarray(curve)
    line, = ax.plot(steps, curve[:settings.T], marker='.', label=(
        f'{METHOD_LABELS[init]}' + (f' (ρ={settings.rho})'
                                    if init in CALIBRATED else '')))
    if init not in CALIBRATED:
      ax.plot(steps, curve[settings.rho:settings.rho + settings.T], ls='--',
              color=line.get_color(), label=f'{METHOD_LABELS[init]} at T+ρ')
  ax.axhline(100 * result['ann_accuracy'], color='k', lw=1, ls=':',
             label='ANN')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('time-steps T')
  ax.set_ylabel('accuracy (%)')
  ax.set_title(f'accuracy vs T ({result["examples"]} examples)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _png(fig)


def offset_spike_histograms(result: dict) -> bytes:
  """Per-layer distribution of ψ before / after calibration (paper Fig. 3).

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
  for shift, (label, stats, hatch) in enumerate(
      (('before', before, ''), ('after', after, '//'))):
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
    tallest = max(tallest, bottom.max())
  # Headroom for the legend; an all-zero plot still gets a visible axis.
  ax.set_ylim(0, 1.25 * tallest if tallest > 0 else 1)
  ax.set_xticks(x, [f'L{i + 1}' for i in range(len(names))])
  ax.set_ylabel('neurons with ψ ≠ 0 (%)')
  ax.set_title(f'offset spikes per layer over T={result["analysis_T"]}: '
               'left bar before, right (hatched) after calibration')
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3, axis='y')
  return _png(fig)
