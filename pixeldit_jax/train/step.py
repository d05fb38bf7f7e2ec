"""The jitted training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixeldit_jax.diffusion import flow
from pixeldit_jax.train import optimizer as optimizer_lib
from pixeldit_jax.train.state import TrainState


def images_to_model(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def ema_decay(tcfg, step: jax.Array) -> jax.Array:
  """The configured decay; with ema_warmup, min(decay, (1 + step) / (10 + step)) (short runs)."""
  decay = jnp.asarray(tcfg.ema_decay, jnp.float32)
  if tcfg.ema_warmup:
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, tcfg, null_class: int):
  """(state, batch) -> (state, metrics). A non-finite loss or gradient leaves the state as it was
  (the update is skipped) and records the step; the loop stops or continues per config."""
  lr_fn = optimizer_lib.learning_rate(tcfg)

  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(state.rng, state.step)
    x = images_to_model(batch["image"])

    def loss_fn(params):
      apply = lambda xt, t, y: nnx.merge(graphdef, params)(xt, t, y)
      return flow.loss(apply, x, batch["label"], key, null_class=null_class, shift=tcfg.time_shift,
                       label_dropout=tcfg.label_dropout)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(tcfg, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32),
                       state.ema_params, params)
    # One branch chosen for the whole tree: no elementwise select over every weight and moment.
    params, ema, opt_state = jax.lax.cond(finite, lambda: (params, ema, opt_state),
                                          lambda: (state.params, state.ema_params, state.opt_state))
    new_state = state.replace(
        step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
        nonfinite_step=jnp.where(~finite & (state.nonfinite_step < 0), state.step, state.nonfinite_step),
        skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
    metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
                   learning_rate=lr_fn(state.step), finite=finite,
                   data_skipped=jnp.sum(batch["skipped"]), data_converted=jnp.sum(batch["converted"]))
    return new_state, metrics

  return train_step
