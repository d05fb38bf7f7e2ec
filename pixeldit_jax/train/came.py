"""CAME (Luo et al., ACL 2023) as an optax GradientTransformation; optax has none.

Follows the released T2I optimizer (``CAMEWrapper`` in PixelDiT's t2i/diffusion/utils/optimizer.py,
from SANA), applied to one torch parameter at a time. For a gradient g of one tensor:

  v = b2 v + (1 - b2) (g² + eps1)    factored: row/column means over the last two axes
  u = g / sqrt(v);  u = u / max(1, RMS(u) / clip_threshold)
  m = b1 m + (1 - b1) u
  s = b3 s + (1 - b3) ((u - m)² + eps2)    factored only
  update = m / sqrt(s) if factored else m
  p = p - lr wd p - lr update

No bias correction: s starts near (1 - b3) (u - m)², so the first factored steps are about
11 lr per element, which the LR warmup absorbs. A factored moment is rebuilt as r c / mean(r)
from its row means r and column means c; mean(r) == mean(c), so a transposed layout (flax
(in, out) kernels vs torch (out, in) weights) gives the transposed result. As in the released
code, only 2-D tensors (and 1x1 conv kernels) are factored; 1-D and other tensors keep a full v
and skip the confidence term. The CAME paper's reference factors every tensor of rank >= 2.

Stacked layers: ``stacked_axes`` gives the number of leading axes of a parameter that stack
separate torch tensors, e.g. 1 for scanned blocks ('layers' axis). Each slice then gets its own
factoring decision, statistics and RMS clip, as the torch parameters of one layer would.

State (fp32): ``mu`` and ``nu`` have the param's shape; the factored statistics keep the param's
rank with the reduced axis set to 1 (row: (..., a, 1), col: (..., 1, b)); leaves that a
parameter does not use are ones-shaped (1, ..., 1) placeholders. So ``optax.tree_map_params`` maps
every state leaf to its param's sharding, and ``state_sharding`` replicates the size-1 axes.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

StackedAxes = Union[int, Any, Callable[[tuple, Any], int]]  # int, pytree of ints, or fn


class CameState(NamedTuple):
  count: jax.Array  # int32 steps taken, for the LR schedule
  mu: Any  # first moment of the clipped update, param-shaped
  nu: Any  # unfactored second moment of g, param-shaped (placeholder if factored)
  nu_row: Any  # factored: mean of g² + eps1 over the last axis, shape (..., a, 1)
  nu_col: Any  # factored: mean over the second-to-last axis, shape (..., 1, b)
  res_row: Any  # factored instability (u - m)² + eps2, like nu_row
  res_col: Any  # ... like nu_col


class _Out:
  """Per-leaf results; not a pytree node, so tree maps stop at it."""

  def __init__(self, values):
    self.values = values


def _key(k) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _per_param(spec, name: str) -> Callable[[tuple, Any], Any]:
  """A per-param setting (one value, a params-like pytree, or a fn) as (path, param) -> value."""
  if callable(spec):
    return spec
  if isinstance(spec, numbers.Integral):  # bools too
    return lambda path, p: spec
  table = {tuple(_key(k) for k in path): n for path, n in jax.tree_util.tree_flatten_with_path(spec)[0]}

  def lookup(path, p):
    if path not in table:
      raise ValueError(f"{name} has no entry for the param at {path}")
    return table[path]
  return lookup


def _layout(stacked, factored, path, x) -> tuple[int, bool]:
  """(stacked axes, factored?) of one param."""
  path = tuple(_key(k) for k in path)
  k = int(stacked(path, x))
  if not 0 <= k <= x.ndim:
    raise ValueError(f"stacked_axes {k} is outside 0..{x.ndim} for the param at {path}")
  fac = None if factored is None else factored(path, x)
  fac = _factored(x.shape[k:]) if fac is None else bool(fac)
  if fac and x.ndim - k < 2:
    raise ValueError(f"cannot factor the param at {path}: its slices have fewer than 2 axes")
  return k, fac


def _factored(slice_shape: Sequence[int]) -> bool:
  """The released rule: 2-D (a Linear) or a 1x1 conv kernel, here in flax layout (1, 1, in, out)."""
  return len(slice_shape) == 2 or (len(slice_shape) == 4 and tuple(slice_shape[:2]) == (1, 1))


def _rsqrt_approx(row, col):
  """1/sqrt of the rank-1 rebuild r c / mean(c) of a factored moment.

  torch divides by the mean of its row factor, indexed by the first axis of an (out, in) weight,
  i.e. by our last axis for a flax (in, out) kernel: our `col`. mean(row) == mean(col) (both are
  EMAs of the full mean), so the choice only changes rounding.
  """
  return jax.lax.rsqrt(col / jnp.mean(col, axis=-1, keepdims=True)) * jax.lax.rsqrt(row)


def came(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         b3: float = 0.9999, eps: Sequence[float] = (1e-30, 1e-16), clip_threshold: float = 1.0,
         weight_decay: float = 0.0, stacked_axes: StackedAxes = 0,
         factored: Optional[Any] = None) -> optax.GradientTransformation:
  """CAME; the returned updates already include -learning_rate and the decoupled weight decay.

  `stacked_axes`: one int for every param, a pytree of ints with the params' structure (e.g.
  ``layer_axes(model)``), or `(path, param) -> int` with path a tuple of dict keys / indices.
  `factored`: None for the released rule on each slice, else a bool / pytree / fn like
  `stacked_axes` (a fn may return None for the rule), e.g. False for a param that is 3-D
  (1, n, d) in torch but 2-D here.
  """
  eps1, eps2 = (float(e) for e in eps)
  stacked = _per_param(stacked_axes, "stacked_axes")
  factored = None if factored is None else _per_param(factored, "factored")
  f32 = jnp.float32

  def init_fn(params):
    def shaped(kind):
      def make(path, p):
        _, fac = _layout(stacked, factored, path, p)
        ones = (1,) * p.ndim
        shape = {"mu": p.shape, "nu": ones if fac else p.shape,
                 "row": p.shape[:-1] + (1,) if fac else ones,
                 "col": p.shape[:-2] + (1, p.shape[-1]) if fac else ones}[kind]
        return jnp.zeros(shape, f32)
      # One tree_map per field, so that tree_map_params sees each field as a params tree.
      return jax.tree_util.tree_map_with_path(make, params)

    return CameState(count=jnp.zeros([], jnp.int32), mu=shaped("mu"), nu=shaped("nu"),
                     nu_row=shaped("row"), nu_col=shaped("col"),
                     res_row=shaped("row"), res_col=shaped("col"))

  def update_fn(updates, state, params=None):
    if weight_decay and params is None:
      raise ValueError("came with weight_decay needs the params: tx.update(grads, state, params)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    lr = jnp.asarray(lr, f32)

    def leaf(path, g, mu, nu, nu_row, nu_col, res_row, res_col, p):
      k, fac = _layout(stacked, factored, path, g)
      rms_axes = tuple(range(k, g.ndim))
      g32 = g.astype(f32)
      sq = jnp.square(g32) + eps1
      if fac:
        nu_row = b2 * nu_row + (1 - b2) * jnp.mean(sq, axis=-1, keepdims=True)
        nu_col = b2 * nu_col + (1 - b2) * jnp.mean(sq, axis=-2, keepdims=True)
        u = g32 * _rsqrt_approx(nu_row, nu_col)
      else:
        nu = b2 * nu + (1 - b2) * sq
        u = g32 * jax.lax.rsqrt(nu)
      rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=rms_axes, keepdims=True))
      u = u / jnp.maximum(rms / clip_threshold, 1.0)
      mu = b1 * mu + (1 - b1) * u
      if fac:
        res = jnp.square(u - mu) + eps2
        res_row = b3 * res_row + (1 - b3) * jnp.mean(res, axis=-1, keepdims=True)
        res_col = b3 * res_col + (1 - b3) * jnp.mean(res, axis=-2, keepdims=True)
        step = mu * _rsqrt_approx(res_row, res_col)
      else:
        step = mu  # the released code has no confidence term for unfactored tensors
      if weight_decay:
        step = step + weight_decay * p.astype(f32)
      return _Out(((-lr * step).astype(g.dtype), mu, nu, nu_row, nu_col, res_row, res_col))

    # Without weight decay the params are not read; the grads stand in for them.
    out = jax.tree_util.tree_map_with_path(
        leaf, updates, state.mu, state.nu, state.nu_row, state.nu_col, state.res_row,
        state.res_col, updates if params is None else params)
    pick = lambda i: jax.tree.map(lambda o: o.values[i], out, is_leaf=lambda x: isinstance(x, _Out))
    return pick(0), CameState(optax.safe_increment(state.count), *(pick(i) for i in range(1, 7)))

  return optax.GradientTransformation(init_fn, update_fn)


def layer_axes(module, axis_name: str = "layers") -> dict:
  """`stacked_axes` for a model's pure-dict params: each param's count of leading `axis_name`
  axes (the stacked-blocks axis of ``layers.stack_blocks``); {} for None."""
  from flax import traverse_util  # noqa: PLC0415
  from pixeldit_jax import sharding  # noqa: PLC0415

  if module is None:
    return {}

  def count(names):
    n = 0
    while n < len(names) and names[n] == axis_name:
      n += 1
    return n

  return traverse_util.unflatten_dict({p: count(n) for p, n in sharding.logical_names(module).items()})


def state_sharding(state_leaf, param_sharding):
  """For ``optax.tree_map_params(tx, state_sharding, state, param_shardings)``: the param's
  sharding with the axes that the state leaf has reduced to size 1 replicated."""
  spec = param_sharding.spec if isinstance(param_sharding, NamedSharding) else param_sharding
  spec = tuple(spec) + (None,) * (len(state_leaf.shape) - len(spec))
  spec = P(*(None if d == 1 else a for d, a in zip(state_leaf.shape, spec)))
  return NamedSharding(param_sharding.mesh, spec) if isinstance(param_sharding, NamedSharding) else spec
