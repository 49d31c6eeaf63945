"""The pure pieces of training the source QCFS ANN: state, optimizer, steps.

``train_step`` and ``eval_step`` are jitted by :mod:`cos_jax.training` with the
batch sharded over the data mesh and everything else replicated; ``jax.jit``
then inserts the gradient (and BatchNorm-statistics) all-reductions, so a step
computes exactly the global-batch update whatever the device count.
"""

from __future__ import annotations

from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """Cosine decay to 0 over all steps (optional linear warmup)."""
  total = config.epochs * steps_per_epoch
  warmup = int(round(config.get('warmup_epochs', 0) * steps_per_epoch))
  if warmup:
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(total, warmup + 1))
  return optax.cosine_decay_schedule(config.learning_rate, total)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay on every parameter.

  ``add_decayed_weights`` before ``sgd`` adds wd·p to the gradient before the
  momentum, which is exactly torch.optim.SGD(weight_decay=wd) as the reference
  uses it (thresholds λ and BatchNorm scales/biases are decayed too).
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch),
                momentum=config.momentum or None,
                nesterov=config.get('nesterov', False)))


def create_train_state(model, rng, image_shape,
                       tx: optax.GradientTransformation) -> TrainState:
  """Initial train state (params, batch_stats, optimizer state, step 0)."""
  variables = model.init(rng, jnp.zeros((1,) + tuple(image_shape),
                                        jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def cross_entropy_loss(logits, labels, weights=None):
  """Mean (or ``weights``-weighted sum) softmax cross-entropy."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if weights is None:
    return losses.mean()
  return (losses * weights).sum()


def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
  """One SGD step on a (global) batch; returns the new state and metrics."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'])
    return cross_entropy_loss(logits, batch['label']), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates['batch_stats'])
  accuracy = (jnp.argmax(logits, -1) == batch['label']).mean()
  return state, {'loss': loss, 'accuracy': accuracy}


def eval_step(state: TrainState, batch) -> dict:
  """Sums of loss / correct / count over the examples with ``mask`` = 1."""
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss': cross_entropy_loss(logits, batch['label'], mask),
          'correct': (correct * mask).sum(), 'count': mask.sum()}
