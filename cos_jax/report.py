"""A conversion's report: the Table-1 layout, per-layer lines, files.

Everything here reads the dict :func:`cos_jax.conversion.convert_and_evaluate`
returns (or the same dict read back from results.json, whose keys are
strings) and writes nothing but the files :func:`write_results` names.
"""

from __future__ import annotations

import csv
import io
import os
import shutil

from cos_jax import ownership, plots, runtime
from cos_jax.conversion_settings import ConversionSettings, reported_steps

FILES = ('results.json', 'results.csv', 'accuracy.png', 'offset_spikes.png',
         'accuracy_energy.png')


report_steps = reported_steps  # 1, 2, 4, ... up to T (T itself included)


def _methods(settings: ConversionSettings) -> dict:
  return {m.name: m for m in settings.methods}


def _pct(x) -> str:
  return '—' if x is None else f'{100 * x:.2f}%'


def at(values: list, t: int):
  """``values[t - 1]``, None past its end."""
  return values[t - 1] if 0 < t <= len(values) else None


def _rows_of(method) -> list[tuple[str, int]]:
  """(row label, shift s) of a method's Table-1 rows: accuracy at T + s. A
  method without a probe has two (at T, and at T + ρ, the paper's
  comparison with a method that spent ρ probe steps)."""
  shifts = method.shifts()
  if len(shifts) == 1:
    return [(method.display(), 0)]
  return [(f'{method.display()} at T' + ('+rho' if s else ''), s)
          for s in shifts]


def ann_label(result: dict) -> str:
  """The ANN row's name: 'ANN (QCFS)', or 'ANN (ReLU)' for a plain-ReLU
  network (results written before the field existed are QCFS)."""
  return f"ANN ({result.get('ann', 'QCFS')})"


def summary_rows(result: dict, settings: ConversionSettings
                 ) -> tuple[list[str], list[list[str]]]:
  """The paper's Table-1 layout: rows per method (:func:`_rows_of`),
  columns T = 1, 2, 4, …; '—' where a method was not run for that T."""
  steps = report_steps(settings.T)
  header = ['method'] + [f'T={t}' for t in steps]
  rows = [[ann_label(result)] + [_pct(result['ann_accuracy'])] * len(steps)]
  for method in settings.methods:
    curve = result['curves'][method.name]
    rows += [[label] + [_pct(at(curve, t + shift)) for t in steps]
             for label, shift in _rows_of(method)]
  return header, rows


def depth(result: dict) -> int:
  """IF layers on the longest path (the cost's count; else every IF layer,
  as in the zoo's chains)."""
  if 'cost' in result:
    return result['cost']['depth']
  return len(result['layers']['before'])


def comparison_rows(result: dict, settings: ConversionSettings
                    ) -> tuple[list[str], list[list[str]]]:
  """One row per method and reported T: the method's own accounting (T),
  its total latency (probe and pre-simulation steps included, as a
  streaming chip would run it), accuracy, and energy per image relative to
  the ANN (as deployed; '—' without costs)."""
  header = ['method', 'T', 'total latency', 'accuracy', 'energy / ANN']
  rows, layers = [], depth(result)
  for method in settings.methods:
    curve = result['curves'][method.name]
    energy = (result['cost']['methods'][method.name]['deployment'][
        'relative_energy'] if 'cost' in result else [])
    for t in report_steps(settings.T):
      e = at(energy, t)
      rows.append([method.display(), str(t),
                   str(method.latency(t, layers)), _pct(at(curve, t)),
                   '—' if e is None else f'{e:.3f}'])
  return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  """The same table in Markdown (docs/comparison.md)."""
  line = lambda r: '| ' + ' | '.join(r) + ' |'
  return '\n'.join([line(header), line(['---'] * len(header))]
                   + [line(r) for r in rows])


def format_table(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(r[i]) for r in [header] + rows) for i in
            range(len(header))]
  line = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  rule = '-' * len(line(header))
  return '\n'.join([line(header), rule] + [line(r) for r in rows])


def format_layers(result: dict) -> str:
  """Per-layer Ratio / MSE / firing rate before and after calibration."""
  before, after = result['layers']['before'], result['layers']['after']
  out = [f'per-layer offset spikes with rho = T = {result["analysis_T"]} '
         f'(Ratio = share with psi=0; constrained = layer fed the SNN\'s '
         f'actual input)',
         f'{"layer":28s} {"Ratio before":>12s} {"after":>8s} '
         f'{"MSE before":>10s} {"after":>8s} {"constr. after":>13s} '
         f'{"rate":>6s}']
  for name in before:
    b, a = before[name], after[name]
    out.append(f'{name:28s} {100 * b["ratio"]:11.2f}% {100 * a["ratio"]:7.2f}%'
               f' {b["mse"]:10.4f} {a["mse"]:8.4f} '
               f'{100 * a["ratio_constrained"]:12.2f}% '
               f'{a["firing_rate"]:6.3f}')
  return '\n'.join(out)


def _cost_lines(result: dict, settings: ConversionSettings
                ) -> list[tuple[str, str, list[int]]]:
  """(row label, method, the t of each T column) of the cost tables: a
  method without a probe at T and at T + ρ; one whose streaming deployment
  differs from what is computed (the layerwise probe) as run and as
  deployed; any other once, with its latency."""
  steps, layers = report_steps(settings.T), depth(result)
  lines = []
  for method in settings.methods:
    rows = _rows_of(method)
    latency = method.latency_text(layers)
    if len(rows) > 1:
      lines += [(label, method.name, [t + s for t in steps])
                for label, s in rows]
    elif method.buffers(1)[0]:
      lines += [(f'{method.display()}, as run', method.name, steps),
                (f'{method.display()}, deployed (latency {latency})',
                 method.name, steps)]
    elif method.pre_passes and method.probes_own_input:
      lines.append((f'{method.display()}, global (latency {latency})',
                    method.name, steps))
    else:
      lines.append((method.display() + (f' (latency {latency})'
                                        if latency != 'T' else ''),
                    method.name, steps))
  return lines


def cost_rows(result: dict, settings: ConversionSettings,
              quantity: str = 'relative_energy'
              ) -> tuple[list[str], list[list[str]]]:
  """Per method (rows as :func:`_cost_lines`) and T = 1, 2, 4, ...
  (columns): the energy per image relative to the ANN
  (``quantity='relative_energy'``) or millions of SOPs per image
  (``'sops'``)."""
  header = ['method'] + [f'T={t}' for t in report_steps(settings.T)]
  scale = 1e-6 if quantity == 'sops' else 1.0
  rows = []
  for label, name, steps in _cost_lines(result, settings):
    cost = result['cost']['methods'][name]
    kind = cost['deployment'] if 'deployed' in label else cost
    rows.append([label] + [
        '—' if at(kind[quantity], t) is None
        else f'{scale * kind[quantity][t - 1]:.3f}' for t in steps])
  return header, rows


def format_costs(result: dict, settings: ConversionSettings) -> str:
  """The cost table with its cost model and the first T at which each
  method (as deployed) costs at least the ANN."""
  if 'cost' not in result:
    return 'no costs counted (cost_model none)'
  cost = result['cost']
  model = cost['cost_model']
  out = [f'cost per image, {model["name"]}: {model["source"]}',
         f'ANN {cost["ann"]["macs"] / 1e6:.3f} M MACs = '
         f'{cost["ann"]["energy_pj"] / 1e6:.3f} uJ; the SNN: its input layer '
         f'{cost["input_macs"] / 1e6:.3f} M MACs (once), then synaptic '
         'operations (SOPs)', _counted(cost), '',
         'energy relative to the ANN',
         format_table(*cost_rows(result, settings)), '',
         'millions of SOPs',
         format_table(*cost_rows(result, settings, 'sops')), '']
  for name, method in cost['methods'].items():
    relative = method['deployment']['relative_energy']
    over = [t for t, e in enumerate(relative, start=1)
            if e is not None and e >= 1]
    out.append(f'{_methods(settings)[name].display()}: as costly as the '
               'ANN from ' + (f'T={over[0]}' if over else
                              f'beyond T={len(relative)}'))
  out += ['', 'each method at its own accounting (T) and at its total '
          'latency', format_table(*comparison_rows(result, settings))]
  return '\n'.join(out)


def _counted(cost: dict) -> str:
  """Which images the counts cover, and the largest standard error of the
  SOPs per image relative to their value."""
  line = (f'spikes counted on the first {cost["examples"]} images '
          f'({cost["batches"]} batches; --cost_examples)')
  errors = [e / s for method in cost['methods'].values()
            for s, e in zip(method['sops'], method['sops_stderr'] or [])
            if s and e is not None]
  if errors:
    line += (f'; standard error of the SOPs per image at most '
             f'{100 * max(errors):.2f}% of their value')
  return line


def format_cost_layers(result: dict, settings: ConversionSettings) -> str:
  """Per IF layer: neurons, mean fan-out, and per method the firing rate
  (spikes per neuron per step) and SOPs per image over T steps."""
  if 'cost' not in result:
    return ''
  cost, T = result['cost'], settings.T
  names = list(cost['methods'])
  header = ['layer', 'neurons', 'fan-out'] + [
      f'{kind} {name}' for name in names for kind in ('rate', 'MSOP')]
  rows = []
  for layer, info in cost['if_layers'].items():
    row = [layer, str(info['neurons']), f'{info["mean_fanout"]:.1f}']
    for name in names:
      stats = cost['methods'][name]['layers'][layer]
      row += [f'{stats["rate"][T - 1]:.3f}', f'{stats["sops"][T - 1] / 1e6:.3f}']
    rows.append(row)
  return (f'per-layer firing rates and synaptic operations per image over '
          f'T={T} steps (main run; global probes not included)\n'
          + format_table(header, rows))


def _csv(result: dict) -> str:
  """Accuracy per method and t; with costs, also SOPs per image and the
  energy relative to the ANN as run and as deployed, and the latency."""
  buf = io.StringIO()
  writer = csv.writer(buf)
  costs = result.get('cost', {}).get('methods')
  cost_columns = ['sops_per_image', 'energy_rel_ann',
                  'deployed_energy_rel_ann', 'latency_steps'] if costs else []
  writer.writerow(['method', 'T', 'accuracy'] + cost_columns)
  writer.writerow(['ann', '', f'{result["ann_accuracy"]:.6f}']
                  + (['', '1.000000', '1.000000', ''] if costs else []))
  for name, curve in result['curves'].items():
    for t, acc in enumerate(curve, start=1):
      if acc is None:  # a per-T method is not run at this t
        continue
      extra = []
      if costs:
        cost = costs[name]
        extra = [f'{cost["sops"][t - 1]:.1f}',
                 f'{cost["relative_energy"][t - 1]:.6f}',
                 f'{cost["deployment"]["relative_energy"][t - 1]:.6f}',
                 cost['deployment']['latency'][t - 1]]
      writer.writerow([name, t, f'{acc:.6f}'] + extra)
  return buf.getvalue()


def write_results(output_dir: str, result: dict, settings: ConversionSettings,
                  meta: dict) -> list[str]:
  """Writes :data:`FILES` (results.json/csv, accuracy, offset-spike and
  accuracy-energy PNGs).

  ``meta`` (what was converted, where, on what) goes into results.json with
  the result and the table. The set is written into a new directory beside
  ``output_dir`` and then put in its place as a whole
  (:func:`cos_jax.runtime.replace_directory`): a kill at any moment leaves
  the previous results or the new ones, never a mix. The caller holds the
  output directory's lock.
  """
  header, rows = summary_rows(result, settings)
  document = {**meta, 'table': {'header': header, 'rows': rows}, **result}
  if 'cost' in result:
    document['cost_table'] = {
        'header': cost_rows(result, settings)[0],
        'relative_energy': cost_rows(result, settings)[1],
        'sops': cost_rows(result, settings, 'sops')[1]}
  contents = {
      'results.json': runtime.json_text(document),
      'results.csv': _csv(result),
      'accuracy.png': plots.accuracy_figure(result, settings),
      'offset_spikes.png': plots.offset_spike_figure(result),
      'accuracy_energy.png': plots.accuracy_energy_figure(result, settings),
  }
  _remove_leftovers(output_dir)
  build = runtime.sibling_tempdir(output_dir)
  try:
    for name in FILES:
      runtime.write_atomic(os.path.join(build, name), contents[name])
    runtime.write_atomic(os.path.join(build, ownership.RESULTS_MARKER), '')
    # Proven again under the lock, just before the old set is deleted.
    ownership.check_output_dir(output_dir, FILES)
    runtime.replace_directory(build, output_dir)
  except BaseException:
    if ownership.is_leftover(build, FILES):
      shutil.rmtree(build, ignore_errors=True)
    raise
  return [os.path.join(output_dir, name) for name in FILES]


def _remove_leftovers(output_dir: str) -> None:
  """Deletes what an earlier, killed write left beside ``output_dir`` (only
  directories holding nothing but what that write makes)."""
  parent = os.path.dirname(os.path.abspath(output_dir))
  prefix = f'.{os.path.basename(os.path.abspath(output_dir))}.tmp-'
  for name in os.listdir(parent) if os.path.isdir(parent) else ():
    path = os.path.join(parent, name)
    if name.startswith(prefix) and ownership.is_leftover(path, FILES):
      shutil.rmtree(path, ignore_errors=True)


def comparison_markdown(paths: list[str]) -> str:
  """The comparison table (:func:`comparison_rows`) of one or more
  results.json files, in Markdown: ``python -m cos_jax.report A.json ...``
  (docs/comparison.md). The ANN's row comes from the first file."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  rows, header, ann, label = [], None, None, None
  for path in paths:
    with open(path) as f:
      result = json.load(f)
    settings = ConversionSettings.from_config(
        ml_collections.ConfigDict(result['config']))
    header, more = comparison_rows(result, settings)
    schedule = settings.calibration.schedule
    rows += [[f'{r[0]} ({schedule})' if 'rho=' in r[0] else r[0]] + r[1:]
             for r in more if r not in rows]
    ann = ann or result['ann_accuracy']
    label = label or ann_label(result)
  rows.append([label, '—', '—', _pct(ann), '1.000'])
  return markdown_table(header, rows)


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  print(comparison_markdown(sys.argv[1:]))
