"""The jitted training step, for both models and both conventions, with optional REPA.

    train_step(state, batch, frozen) -> (state, metrics)

`batch` holds the data (image uint8 NHWC and the skipped/converted counters) and the condition:
  label      int32 (B,)               class-conditional model
  text_emb   float (B, L, C)          text-to-image model, embeddings from a cache, or
  text_ids   int32 (B, T) + text_mask the caption tokens; the frozen encoder runs inside the step
  repa_target float (B, N, 768)       optional precomputed teacher features
`frozen` holds what is not trained: {"teacher": DINOv2 params, "text": encoder params,
"null_text": (1, L, C) null embedding}, each present only when used.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixeldit_jax.diffusion import flow
from pixeldit_jax.train import optimizer as optimizer_lib
from pixeldit_jax.train import repa as repa_lib
from pixeldit_jax.train import state as state_lib
from pixeldit_jax.train.state import TrainState


def images_to_model(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def _all_finite(tree) -> jax.Array:
  """One scalar: every floating leaf of `tree` is finite (integer leaves, e.g. counts, are)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _adam_count(opt_state) -> jax.Array:
  """Updates applied so far, as AdamW's learning-rate schedule counts them (skips excluded)."""
  found = [x.count for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(x, optax.ScaleByAdamState)]
  if len(found) != 1:
    raise ValueError(f"expected one AdamW state in the optimizer state, found {len(found)}")
  return found[0]


def ema_decay(tcfg, step: jax.Array) -> jax.Array:
  """The configured decay; with ema_warmup, min(decay, (1 + step) / (10 + step)) (short runs)."""
  decay = jnp.asarray(tcfg.ema_decay, jnp.float32)
  if tcfg.ema_warmup:
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


class Teacher:
  """How the step gets REPA targets: a frozen teacher run on the batch, or precomputed ones."""

  def __init__(self, features_fn: Optional[Callable] = None, input_size=None, grid=None):
    self.features_fn = features_fn  # (params, images in [0, 1] NHWC, size) -> (B, N, C)
    self.input_size = input_size  # teacher input (H, W)
    self.grid = grid  # teacher token grid (h, w)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config, *,
                    projector_graphdef: Optional[nnx.GraphDef] = None,
                    teacher: Optional[Teacher] = None,
                    encode_text: Optional[Callable] = None):
  """(state, batch, frozen) -> (state, metrics). A non-finite loss, gradient or learning rate
  (with CAME also a non-finite new state) leaves the weights, EMA and optimizer state as they
  were (the update is skipped; metrics["finite"] is False) and records the step; the loop stops
  or continues per config. An AdamW update that overflows from finite inputs is reported the same
  way but not undone (see `train_step`).

  `encode_text(params, ids, mask) -> (emb, mask)` is the frozen text encoder for batches that carry
  tokens. REPA is on when config.repa.weight > 0 (then `projector_graphdef` and `teacher` are set).

  With LoRA (config.train.lora.rank > 0) `graphdef` is the adapted model's: the gradient is taken
  with respect to the adapters (and projector) only, so the base weights pass through unchanged.
  """
  tcfg = config.train
  model_cfg = config.model
  text_to_image = model_cfg.get("text_dim") is not None
  p = model_cfg.patch_size
  rcfg = config.get("repa")
  use_repa = bool(rcfg is not None and rcfg.weight > 0)
  lr_fn = optimizer_lib.learning_rate(tcfg)
  # AdamW's moments are convex combinations of their finite old values and of g and g^2, each
  # finite once the global gradient norm is, so whether its update will be finite is known
  # before computing it. CAME's factored statistics divide, so its new state is checked.
  adam_state_follows_grads = tcfg.get("optimizer", "adamw") == "adamw"
  use_lora = state_lib.lora_on(tcfg.get("lora"))

  def condition(batch: dict, frozen: dict):
    if not text_to_image:
      return batch["label"]
    if "text_emb" in batch:
      return batch["text_emb"].astype(jnp.float32)
    emb, _ = encode_text(frozen["text"], batch["text_ids"], batch["text_mask"])
    return jax.lax.stop_gradient(emb)

  def repa_target(batch: dict, frozen: dict):
    if "repa_target" in batch:
      return batch["repa_target"]
    images01 = batch["image"].astype(jnp.float32) / 255.0
    return jax.lax.stop_gradient(teacher.features_fn(frozen["teacher"], images01, teacher.input_size))

  def train_step(state: TrainState, batch: dict, frozen: dict):
    key = jax.random.fold_in(state.rng, state.step)
    x = images_to_model(batch["image"])
    cond = condition(batch, frozen)
    grid = (x.shape[1] // p, x.shape[2] // p)
    target = repa_target(batch, frozen) if use_repa else None

    def loss_fn(trainable):
      weights, projector = trainable
      model = nnx.merge(graphdef, state.params, weights) if use_lora else nnx.merge(graphdef, weights)
      aux = {}

      def apply(xt, t, c):
        if not use_repa:
          return model(xt, t, c)
        out, feats = model(xt, t, c, capture_block=rcfg.block)
        aux["features"] = feats
        return out

      if text_to_image:
        flow_loss = flow.sigma_loss(apply, x, cond, key, null_text=frozen["null_text"],
                                    shift=tcfg.time_shift, text_dropout=tcfg.label_dropout,
                                    integer_time=tcfg.get("t2i_integer_timesteps", True))
      else:
        flow_loss = flow.loss(apply, x, cond, key, null_class=model_cfg.num_classes,
                              shift=tcfg.time_shift, label_dropout=tcfg.label_dropout)
      if not use_repa:
        return flow_loss, (flow_loss, jnp.zeros((), jnp.float32))
      student = nnx.merge(projector_graphdef, projector)(aux["features"])
      repa_loss = repa_lib.loss(student, grid, target, teacher.grid, rcfg.loss_form)
      return flow_loss + rcfg.weight * repa_loss, (flow_loss, repa_loss)

    # The trained weights: the model's params, or with LoRA the adapters (the base is a constant).
    old_weights, old_ema = ((state.lora["params"], state.lora["ema"]) if use_lora
                            else (state.params, state.ema_params))
    trainable = (old_weights, state.projector)
    (loss, (flow_loss, repa_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grad_norm = optax.global_norm(grads)
    decay = ema_decay(tcfg, state.step)

    def update():
      updates, opt_state = tx.update(grads, state.opt_state, trainable)
      params, projector = optax.apply_updates(trainable, updates)
      ema = jax.tree.map(lambda e, q: decay * e + (1.0 - decay) * q.astype(jnp.float32), old_ema, params)
      return params, projector, ema, opt_state

    def keep():
      return old_weights, state.projector, old_ema, state.opt_state

    if adam_state_follows_grads:
      # AdamW: decided before the update, so that the update is computed inside the branch,
      # in place in the donated buffers. Choosing between a computed update and the old state
      # afterwards kept both alive and copied the whole state (weights, EMA, both moments) into
      # the donated buffers every step: 8% of the CPU step at 256^2. With a finite gradient,
      # weights and learning rate every AdamW update is finite short of float32 overflow
      # (|lr x update| > 3e38); such an overflow is still reported (finite=False, the trainer
      # stops or skips per policy) but no longer undone.
      ready = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
               & jnp.isfinite(lr_fn(_adam_count(state.opt_state))))
      params, projector, ema, opt_state = jax.lax.cond(ready, update, keep)
      param_norm = optax.global_norm(params)
      finite = ready & jnp.isfinite(param_norm) & jnp.isfinite(optax.global_norm(projector))
    else:
      params, projector, ema, opt_state = update()
      param_norm = optax.global_norm(params)
      # A finite gradient can still make a non-finite update (LR = inf, overflow, CAME's
      # factored statistics): the candidate weights and optimizer state are checked, and the
      # old state is kept if they are not finite. A finite norm also bounds every weight well
      # below the float32 range, so the EMA of finite weights stays finite without its own check.
      finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
                & jnp.isfinite(optax.global_norm(projector)) & _all_finite(opt_state))
      # One branch chosen for the whole tree: no elementwise select over every weight and moment.
      params, projector, ema, opt_state, param_norm = jax.lax.cond(
          finite, lambda: (params, projector, ema, opt_state, param_norm),
          lambda: keep() + (optax.global_norm(old_weights),))
    weights = (dict(params=state.params, ema_params=state.ema_params, lora={"params": params, "ema": ema})
               if use_lora else dict(params=params, ema_params=ema))
    new_state = state.replace(
        step=state.step + 1, projector=projector, opt_state=opt_state, **weights,
        # Steps are named by their count once done (state.step + 1), as metrics.jsonl names them.
        nonfinite_step=jnp.where(~finite & (state.nonfinite_step < 0), state.step + 1,
                                 state.nonfinite_step),
        skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
    metrics = dict(loss=loss, flow_loss=flow_loss, repa_loss=repa_loss, grad_norm=grad_norm,
                   param_norm=param_norm, learning_rate=lr_fn(state.step), finite=finite,
                   data_skipped=jnp.sum(batch["skipped"]), data_converted=jnp.sum(batch["converted"]))
    return new_state, metrics

  return train_step
