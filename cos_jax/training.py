"""Training the source QCFS ANN: the loop, its checkpoints and its log.

:func:`train_and_evaluate` is what ``train.py`` runs. It is built from a few
named steps: :func:`prepare` (every check, before the workdir is touched),
:func:`restore_or_init`, :func:`train_epoch` and :func:`end_of_epoch`. The
pure pieces (state, optimizer, steps) are in :mod:`cos_jax.train_steps`.

Data parallelism: one ``jax.sharding.Mesh`` over all devices with axis
``'data'``; batches are sharded along it, parameters and optimizer state are
replicated. Multi-host: each process feeds its own shard of the data and
``jax.make_array_from_process_local_data`` assembles the global batch.

Crash consistency: the run holds an exclusive lock on its workdir; a step
checkpoint is the commit point of everything before it (see
:func:`end_of_epoch`), and every saved array carries a digest.

Resume: a run restarted from a checkpoint at step ``s`` re-opens epoch
``s // steps_per_epoch`` and skips the batches already done, so it ends with
the same parameters (and log) as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cos_jax import checkpoints, interop, runtime
from cos_jax.checkpoints import CheckpointError
from cos_jax.data import prepare as data_prepare
from cos_jax.metrics_log import (DivergedError, MetricsLog, RunningSums,
                                 progress_bar, say)
from cos_jax.train_config import (abstract_variables, check_devices,
                                  create_model, model_kwargs, plain,
                                  validate_config, with_data_shards)
from cos_jax.train_input import (DataPlan, eval_batches, plan_data,
                                 train_batches)
from cos_jax.train_steps import (TrainState, create_optimizer,
                                 create_train_state, learning_rate_schedule,
                                 train_step, eval_step)

# The 'rbg' PRNG compiles the initialisation much faster than the
# (partitionable) threefry default on CPU, where it otherwise dominates the
# start-up of a run.
INIT_RNG_IMPL = 'rbg'


def _variables(state: TrainState) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


@dataclasses.dataclass(frozen=True)
class Run:
  """What stays fixed while a run trains (built by :func:`prepare`)."""
  config: ml_collections.ConfigDict
  workdir: str
  plan: DataPlan
  model: Any
  init_state: Callable[[], TrainState]
  schedule: optax.Schedule
  train_step: Callable
  eval_step: Callable
  replicated: jax.sharding.NamedSharding
  batch_sharding: jax.sharding.NamedSharding
  resuming: bool

  @property
  def steps_per_epoch(self) -> int:
    return self.plan.steps_per_epoch

  @property
  def total_steps(self) -> int:
    return self.config.epochs * self.plan.steps_per_epoch

  @property
  def stop_step(self) -> int:
    return min(self.total_steps,
               self.config.stop_after_steps or self.total_steps)

  @property
  def is_main(self) -> bool:
    return self.plan.process_index == 0


def prepare(config: ml_collections.ConfigDict, workdir: str,
            restart: bool = False) -> Run:
  """Every check and set-up that does not write to ``workdir``
  (``restart``: as in :func:`train_and_evaluate`).

  Raises:
    ConfigError / CheckpointError / DatasetUnavailableError (one line).
  """
  validate_config(config)
  config = with_data_shards(config, jax.process_count())
  resuming = checkpoints.check_workdir(config, workdir, restart)
  check_devices(config)
  plan = plan_data(config, jax.process_index(), jax.process_count())
  model = create_model(config, plan.spec.num_classes)
  abstract_variables(config, model)  # the model takes the dataset's images
  data_prepare.get_builder(config.dataset, config.data_dir)
  replicated, batch_sharding = runtime.shardings(runtime.make_mesh())
  tx = create_optimizer(config, plan.steps_per_epoch)
  # Initialise on one device, then replicate: the initial parameters cannot
  # depend on the device count.
  init = jax.jit(functools.partial(create_train_state, model,
                                   image_shape=plan.spec.image_shape, tx=tx))
  init_state = lambda: runtime.to_global(jax.device_get(init(
      jax.random.key(config.seed, impl=INIT_RNG_IMPL))), replicated)
  return Run(
      config=config, workdir=workdir, plan=plan, model=model,
      init_state=init_state,
      schedule=learning_rate_schedule(config, plan.steps_per_epoch),
      train_step=jax.jit(train_step, in_shardings=(replicated, batch_sharding),
                         out_shardings=(replicated, replicated),
                         donate_argnums=(0,)),
      eval_step=jax.jit(eval_step, in_shardings=(replicated, batch_sharding),
                        out_shardings=replicated),
      replicated=replicated, batch_sharding=batch_sharding, resuming=resuming)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def _host_state(tree, step: int):
  """``tree`` on the host, refused if any value is not finite."""
  if not bool(runtime.to_host(_all_finite(tree))):
    raise DivergedError(f'training diverged: the state at step {step} holds '
                        'non-finite values, so it was not saved. Lower '
                        '--config.learning_rate, then rerun: it resumes from '
                        'the last checkpoint')
  return runtime.to_host(tree)


def save_state(manager: checkpoints.Manager, step: int, state: TrainState,
               sums: RunningSums) -> None:
  """A step checkpoint: variables, optimizer state and the metric sums."""
  progress = sums.to_array()  # settles the last step (raises if it diverged)
  variables, train = _host_state(
      (_variables(state), {'step': state.step, 'opt_state': state.opt_state}),
      step)
  manager.save(step, variables=variables,
               train={**train, 'progress': progress})


def crash_point(phase: str, step: int) -> None:
  """Fault injection for the crash-consistency tests: SIGKILLs this process
  when ``$COS_JAX_CRASH_AT`` is ``<phase>@<step>`` (or
  ``<phase>@<step>@<process index>``). A no-op otherwise."""
  target = os.environ.get('COS_JAX_CRASH_AT')
  if target in (f'{phase}@{step}', f'{phase}@{step}@{jax.process_index()}'):
    os.kill(os.getpid(), signal.SIGKILL)


def restore_or_init(run: Run, manager: checkpoints.Manager
                    ) -> tuple[TrainState, np.ndarray | None]:
  """The latest checkpoint's state and metric sums, or a new state and None."""
  state = run.init_state()
  step = manager.latest_step() if run.resuming else None
  if step is None:
    if run.config.get('init_from_torch'):
      state = _from_torch(run, state)
    elif run.config.get('init_from_workdir'):
      state = _from_workdir(run, state)
    return state, None
  variables = manager.restore_variables(step, _variables(state))
  train = manager.restore_train(step, {
      'step': np.zeros((), np.int32),
      'opt_state': checkpoints.host_zeros(state.opt_state),
      'progress': RunningSums.zeros()})
  opt_state, variables = runtime.to_global(
      (train['opt_state'], variables), run.replicated)
  state = state.replace(
      step=runtime.to_global(train['step'], run.replicated),
      opt_state=opt_state, params=variables['params'],
      batch_stats=variables['batch_stats'])
  return state, train['progress']


def _from_torch(run: Run, state: TrainState) -> TrainState:
  """``state`` with the variables of the config's PyTorch checkpoint."""
  config = run.config
  _, variables = interop.load_torch_checkpoint(
      config.init_from_torch, arch=config.model,
      num_classes=run.plan.spec.num_classes, levels=config.levels,
      **model_kwargs(config))
  return _with_variables(state, variables, config.init_from_torch, run)


def _from_workdir(run: Run, state: TrainState) -> TrainState:
  """``state`` with the variables of another workdir's best checkpoint."""
  source = run.config.init_from_workdir
  variables = checkpoints.restore(source, which='best').variables
  return _with_variables(state, variables, source, run)


def _with_variables(state: TrainState, variables: dict, source: str,
                    run: Run) -> TrainState:
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), _variables(state))
  loaded = jax.tree.map(lambda x: (x.shape, x.dtype), variables)
  if expected != loaded:
    raise CheckpointError(f'{source} does not hold the config\'s '
                          f'{run.config.model}: its tree differs')
  variables = runtime.to_global(jax.device_get(variables), run.replicated)
  return state.replace(params=variables['params'],
                       batch_stats=variables['batch_stats'])


def evaluate(run: Run, state: TrainState) -> dict:
  """Test loss/accuracy of ``state`` over the whole (possibly capped) split."""
  keys = ('loss', 'correct', 'count')
  row = lambda sums: np.array(runtime.to_host([sums[k] for k in keys]))
  totals, pending = np.zeros(len(keys)), None
  for batch in eval_batches(run.config, run.plan):
    sums = run.eval_step(state, runtime.to_global(batch, run.batch_sharding))
    if pending is not None:  # fetched one batch late: keeps the device busy
      totals += row(pending)
    pending = sums
  if pending is not None:
    totals += row(pending)
  loss, correct, count = totals
  if run.plan.num_test is not None and int(round(count)) != run.plan.num_test:
    raise RuntimeError(f'evaluated {count:.0f} test examples, expected '
                       f'{run.plan.num_test}')
  return {'test_loss': loss / max(count, 1),
          'test_accuracy': correct / max(count, 1),
          'test_examples': int(round(count))}


def train_epoch(run: Run, state: TrainState, step: int, sums: RunningSums,
                manager: checkpoints.Manager, log: MetricsLog, bar
                ) -> tuple[TrainState, int]:
  """Trains from ``step`` to the end of its epoch (or to ``run.stop_step``).

  Logs every ``log_every_steps`` and saves every ``checkpoint_every_steps``
  (the epoch's last step is saved by :func:`end_of_epoch`, or by the caller
  when the run stops inside the epoch). Returns the state and the new step.
  """
  config, per_epoch = run.config, run.steps_per_epoch
  epoch, offset = divmod(step, per_epoch)
  end = min((epoch + 1) * per_epoch, run.stop_step)
  interval_start, interval_steps = time.time(), 0
  batches = itertools.islice(train_batches(config, run.plan, epoch, offset),
                             end - step)
  for batch in batches:
    state, metrics = run.train_step(
        state, runtime.to_global(batch, run.batch_sharding))
    step += 1
    interval_steps += 1
    sums.push(metrics, step)
    runtime.raise_if_stopped()
    if step % config.log_every_steps == 0 or step % per_epoch == 0:
      summary = sums.take_interval()
      summary['images_per_second'] = (
          interval_steps * config.batch_size
          / max(time.time() - interval_start, 1e-9))
      summary['learning_rate'] = float(run.schedule(step - 1))
      log.write(step, epoch=step / per_epoch, **summary)
      bar.set_postfix(loss=f'{summary["train_loss"]:.3f}',
                      acc=f'{summary["train_accuracy"]:.3f}', epoch=epoch + 1,
                      refresh=False)
      interval_start, interval_steps = time.time(), 0
    if step % config.checkpoint_every_steps == 0 and step < end:
      save_state(manager, step, state, sums)
      crash_point('periodic_checkpoint', step)
  sums.settle()
  if step != end:
    raise RuntimeError(
        f'the training data of epoch {epoch} ended after '
        f'{step - epoch * per_epoch} batches; expected {end - epoch * per_epoch}'
        f' (is num_train_examples larger than the split?)')
  return state, step


def end_of_epoch(run: Run, state: TrainState, step: int, sums: RunningSums,
                 best: dict, managers, log: MetricsLog, bar,
                 seconds: float) -> tuple[dict, dict]:
  """Evaluates (when due), keeps the best, logs one epoch record, saves.

  The step checkpoint is written last and is the commit point of the epoch:
  a run killed before it finalises resumes from the previous checkpoint and
  redoes the epoch, identically; ``best/`` and the log record, written first,
  then come out the same again (the log drops records after the step it
  resumes from). Returns ``(best, record)``.
  """
  manager, best_manager = managers
  completed = step // run.steps_per_epoch
  record = {'epoch': completed, 'epoch_seconds': seconds, **sums.take_epoch()}
  crash_point('epoch_trained', step)
  if (completed % run.config.eval_every_epochs == 0
      or step == run.total_steps):
    record.update(evaluate(run, state))
    crash_point('evaluated', step)
    if record['test_accuracy'] > best['test_accuracy']:
      best = {'step': step, 'epoch': completed,
              **{k: v for k, v in record.items() if k.startswith('test_')}}
      best_manager.save(step, variables=_host_state(_variables(state), step),
                        metadata=best)
      crash_point('best_saving', step)
      best_manager.wait()
      crash_point('best_saved', step)
    record['best_test_accuracy'] = best['test_accuracy']
  log.write(step, **record)
  crash_point('logged', step)
  save_state(manager, step, state, sums)
  crash_point('checkpoint_saving', step)
  manager.wait()
  crash_point('checkpoint_saved', step)
  text = (f'epoch {completed}/{run.config.epochs}  train loss '
          f'{record["train_loss"]:.4f} acc '
          f'{100 * record["train_accuracy"]:.2f}%')
  if 'test_accuracy' in record:
    text += (f'  test loss {record["test_loss"]:.4f} acc '
             f'{100 * record["test_accuracy"]:.2f}% (best '
             f'{100 * best["test_accuracy"]:.2f}%)')
  say(text + f'  [{seconds:.0f}s]', bar)
  return best, record


def _announce(run: Run, state: TrainState, step: int, log: MetricsLog) -> None:
  config = run.config
  if step == 0:
    log.hparams({k: v for k, v in plain(config).items()
                 if isinstance(v, (int, float, str, bool))})
    say(f'{config.model} (L={config.levels}) on {config.dataset}: '
        f'{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), global '
        f'batch {config.batch_size}, {run.steps_per_epoch} steps/epoch, '
        f'{config.epochs} epochs')
  elif step >= run.total_steps:
    say(f'the run in {run.workdir} is finished (step {step} of '
        f'{run.total_steps}): nothing to train, its log is kept; pass '
        '--restart to train it again from step 0')
  else:
    say(f'resuming {run.workdir} from step {step} (epoch '
        f'{step // run.steps_per_epoch}, batch {step % run.steps_per_epoch} '
        f'of {run.steps_per_epoch})')


def _open_managers(run: Run):
  """The step and best checkpoint managers (leftover partial saves removed)."""
  workdir = os.path.abspath(run.workdir)
  async_save = run.config.get('async_checkpointing', True)
  managers = []
  for name, keep in ((checkpoints.CHECKPOINT_DIR, run.config.keep_checkpoints),
                     (checkpoints.BEST_DIR, 1)):
    directory = os.path.join(workdir, name)
    if run.is_main:
      for leftover in checkpoints.remove_unfinished_checkpoints(directory):
        say(f'removed the unfinished checkpoint {directory}/{leftover}')
    managers.append(checkpoints.Manager(directory, max_to_keep=keep,
                                        create=True, async_save=async_save))
  return managers


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart: bool = False) -> dict[str, Any]:
  """Trains the QCFS ANN of ``config``; resumes from ``workdir`` if possible.

  Args:
    config: see ``configs/default.py`` for the fields.
    workdir: where checkpoints, config.json, log.jsonl and summaries go: a
      new or empty directory, or one train.py wrote (else refused).
    restart: train from step 0 in a workdir train.py wrote, deleting its
      checkpoints and log first (``train.py --restart``).

  Returns:
    Final metrics: step, epoch, train_loss, train_accuracy, test_loss,
    test_accuracy, best_test_accuracy, best_step, ... (test metrics of the
    last evaluation; ``stopped_early`` if ``stop_after_steps`` ended the run).

  Raises:
    ConfigError / CheckpointError / cos_jax.data.DatasetUnavailableError
    (one-line messages) before anything in ``workdir`` is written.
  """
  run = prepare(config, workdir, restart)
  if not run.is_main:
    return _train(run)
  os.makedirs(workdir, exist_ok=True)
  with runtime.exclusive_lock(os.path.join(workdir, checkpoints.LOCK_FILE),
                              f'--workdir {workdir}'):
    # Again under the lock: another run may have written here meanwhile.
    if restart and checkpoints.read_config(workdir) is not None:
      checkpoints.clear_workdir(workdir)  # proves train.py wrote it
      say(f'--restart: deleted the checkpoints and log of {workdir}; '
          'training from step 0')
    if not checkpoints.check_workdir(run.config, workdir):
      runtime.write_json_atomic(
          os.path.join(workdir, checkpoints.CONFIG_FILE), plain(run.config))
    return _train(run)


def _train(run: Run) -> dict[str, Any]:
  """The training loop of :func:`train_and_evaluate` (workdir checked)."""
  config, workdir = run.config, run.workdir
  manager, best_manager = managers = _open_managers(run)
  state, saved_sums = restore_or_init(run, manager)
  step = int(runtime.to_host(state.step))
  bar = progress_bar(run.stop_step * config.batch_size,
                     step * config.batch_size, run.is_main)
  sums = RunningSums(on_step=lambda: bar.update(config.batch_size))
  if saved_sums is not None:
    sums.restore(saved_sums, step, run.steps_per_epoch, config.log_every_steps)
  best_step = best_manager.latest_step()
  best = (best_manager.restore_metadata(best_step) if best_step is not None
          else {'test_accuracy': -1.0, 'step': None})
  log = MetricsLog(workdir, run.is_main, resume_step=step)
  _announce(run, state, step, log)
  final = {'step': step, 'epoch': step / run.steps_per_epoch}
  start = time.time()
  try:
    while step < run.stop_step:
      epoch_start = time.time()
      state, step = train_epoch(run, state, step, sums, manager, log, bar)
      final.update(step=step, epoch=step / run.steps_per_epoch)
      if step % run.steps_per_epoch:  # stopped inside the epoch
        final.update(sums.epoch_means())
        save_state(manager, step, state, sums)
        break
      best, record = end_of_epoch(run, state, step, sums, best, managers, log,
                                  bar, time.time() - epoch_start)
      final.update({k: v for k, v in record.items() if k != 'epoch'})
  finally:
    bar.close()
    for m in managers:
      m.wait()
  if step >= run.total_steps and 'test_accuracy' not in final:
    final.update(evaluate(run, state))  # a finished run restarted: report
  if step < run.total_steps:
    final['stopped_early'] = True
  final.update(best_test_accuracy=best['test_accuracy'],
               best_step=best['step'], wall_seconds=time.time() - start)
  log.close()
  for m in managers:
    m.close()
  if 'test_accuracy' in final:
    say(f'final test accuracy {100 * final["test_accuracy"]:.2f}% (best '
        f'{100 * best["test_accuracy"]:.2f}% at step {best["step"]}), step '
        f'{step}/{run.total_steps}')
  else:
    say(f'stopped at step {step}/{run.total_steps}; rerun the same command to '
        f'resume')
  return final
