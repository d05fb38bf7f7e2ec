"""Training-free editing with a flow model: FlowEdit, image-to-image (SDEdit) and inpainting.

Both time conventions are handled through noise levels sigma (1 = noise, 0 = data):
x_sigma = (1 - sigma) x0 + sigma eps. A class-conditional (ImageNet, t) model sees t = 1 - sigma
and its velocity is negated (``flow.to_sigma``); a text-to-image model sees 1000 sigma. Every
method walks the configured sampler's own grid (``samplers.stepper``), so `num_steps` and the flow
shift mean what they mean when sampling, and the steps after a partial start are made by that
sampler's code, CFG and interval included.

FlowEdit (Kulikov et al. 2024, "Inversion-free text-based editing using pre-trained flow
models"). With levels s_0 > ... > s_N = 0 of an N-step grid, z starts at the source image at
s_{N - n_max}; for each step i up to N - n_min:

    eps_k ~ N(0, I), k = 1..n_avg                 (fresh every step)
    zs_k = (1 - s_i) x_src + s_i eps_k            (the source, noised)
    zt_k = z + zs_k - x_src                       (the same noise, carried onto the edit path)
    dv   = mean_k [ v(zt_k, s_i, target, w_tar) - v(zs_k, s_i, source, w_src) ]
    z   += (s_{i+1} - s_i) dv

Nothing is inverted: z never holds noise, only the source plus the accumulated difference of the
two conditional velocities. With n_min > 0 the last n_min steps are ordinary sampling with the
target condition, from z + zs - x_src at s_{N - n_min}. The same condition on both sides gives
dv = 0 and returns the source exactly (CFG scales equal).

Image-to-image: strength s in [0, 1] runs the last round(s N) steps of the configured sampler from
the source noised to that step's level (s = 0: the source unchanged; s = 1: plain sampling).
Inpainting is the same with a mask (True = regenerate): after every step the pixels outside the
mask are replaced by the source noised to the new level with the start noise, so the kept region
stays on its own straight flow path and ends exactly at the source.

The step functions are jitted once per shape and settings (`Editor` caches them); the loop over
steps runs in Python so that a progress callback sees every step. Noise is drawn per image from
fold_in(PRNGKey(seed), index), so an image's edit does not depend on the batch it is in.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pixeldit_jax.diffusion import samplers

T2I = "t2i_sigma"  # the time conventions as checkpoints record them
C2I = "c2i_t"
CONVENTIONS = (C2I, T2I)
_START = 0x7FFFFFFF  # the noise index of a partial start (steps use their own index)


def _noise(keys, i, k, shape):
  """Per-image N(0, I) for step `i`, realisation `k`."""
  return jax.vmap(lambda key: jax.random.normal(
      jax.random.fold_in(jax.random.fold_in(key, i), k), shape))(keys)


def _noised(x, eps, sigma):
  return (1.0 - sigma) * x + sigma * eps


class Editor:
  """The three editing methods for one model (`model_fn(params, x, time, cond)`), one sampler.

  `convention` is C2I (labels, time t) or T2I (text embeddings, time 1000 sigma); `sampler`,
  `num_steps`, `shift` and `interval` are the sampling settings (config.sample). Conditions are
  arrays with a leading batch axis: class labels (B,) or embeddings (B, L, C); `uncond` is the
  null class or the negative-prompt embedding. Images are float (B, H, W, C) in [-1, 1].
  """

  def __init__(self, model_fn: Callable, convention: str, *, sampler: str, num_steps: int,
               shift: float = 1.0, interval=(0.0, 1.0)):
    if convention not in CONVENTIONS:
      raise ValueError(f"unknown time convention {convention!r}; one of {CONVENTIONS}")
    sigma_sampler = sampler in samplers.SIGMA_SAMPLERS
    if sigma_sampler != (convention == T2I):
      raise ValueError(f"sampler {sampler!r} is for the {'sigma' if sigma_sampler else 't'} convention, "
                       f"but the model was trained in {convention!r}")
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    self.model_fn, self.convention, self.sampler = model_fn, convention, sampler
    self.num_steps, self.shift, self.interval = int(num_steps), float(shift), tuple(interval)
    grid = samplers.stepper(sampler, None, None, num_steps=num_steps, shift=shift).grid
    self.sigmas = grid if convention == T2I else 1.0 - grid  # the grid's noise levels
    self._jitted = {}

  # ------------------------------------------------------------------------- building blocks

  def _stepper(self, params, cond, uncond, cfg_scale):
    apply = lambda x, t, c: self.model_fn(params, x, t, c)
    return samplers.stepper(self.sampler, apply, cond, uncond, num_steps=self.num_steps,
                            cfg_scale=cfg_scale, interval=self.interval, shift=self.shift)

  def velocity(self, params, x, sigma, cond, uncond, cfg_scale):
    """eps - x0 at level sigma, with CFG, through the samplers' own guidance code."""
    apply = lambda a, t, c: self.model_fn(params, a, t, c)
    if self.convention == T2I:
      return samplers.sigma_guided(apply, x, sigma, cond, uncond, cfg_scale, self.interval)
    return -samplers.guided(apply, x, 1.0 - sigma, cond, uncond, cfg_scale, self.interval)

  def _jit(self, key, make):
    if key not in self._jitted:
      self._jitted[key] = jax.jit(make())
    return self._jitted[key]

  def _sampler_fns(self, cfg_scale):
    """Jitted (init, step, finish) of the configured sampler; step also re-imposes the source
    outside `keep_mask` == False (inpainting; all True: plain sampling)."""
    def make_init():
      def init(params, x, start, cond, uncond):
        return self._stepper(params, cond, uncond, cfg_scale).init(x, start)
      return init

    def make_step():
      def step(params, carry, i, cond, uncond, x_src, eps, edit_mask):
        carry = self._stepper(params, cond, uncond, cfg_scale).step(carry, i)
        x = jnp.where(edit_mask, carry[0], _noised(x_src, eps, self.sigmas[i + 1]))
        return (x, *carry[1:])
      return step

    def make_finish():
      def finish(params, carry, cond, uncond, x_src, edit_mask):
        x = self._stepper(params, cond, uncond, cfg_scale).finish(carry)
        return jnp.where(edit_mask, x, x_src)  # the last level is 0: the source itself
      return finish

    return (self._jit(("init", cfg_scale), make_init), self._jit(("step", cfg_scale), make_step),
            self._jit(("finish", cfg_scale), make_finish))

  def _keys(self, n, seed, indices):
    indices = jnp.arange(n) if indices is None else jnp.asarray(indices)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(indices)

  def _sample_from(self, params, x, start, cond, uncond, cfg_scale, x_src, eps, edit_mask, progress):
    init, step, finish = self._sampler_fns(float(cfg_scale))
    carry = init(params, x, jnp.int32(start), cond, uncond)
    model_steps = samplers.stepper(self.sampler, None, None, num_steps=self.num_steps).num_steps
    for i in range(start, model_steps):
      carry = step(params, carry, jnp.int32(i), cond, uncond, x_src, eps, edit_mask)
      _tick(progress)
    x = finish(params, carry, cond, uncond, x_src, edit_mask)
    if model_steps < self.num_steps:  # the released Heun's last step, made by `finish`
      _tick(progress)
    return x

  # ------------------------------------------------------------------------- methods

  def start_step(self, strength: float) -> int:
    """Image-to-image: the grid index the sampler starts from for `strength` in [0, 1]."""
    if not 0.0 <= strength <= 1.0:
      raise ValueError(f"strength must be in [0, 1], got {strength}")
    return self.num_steps - int(round(strength * self.num_steps))

  def img2img(self, params, x_src, cond, uncond, *, strength: float, cfg_scale: float, seed: int = 0,
              indices=None, mask=None, progress=None):
    """SDEdit: the source noised to the level of step start_step(strength), then sampled with the
    configured sampler. `mask` (B, H, W, 1) bool, True = regenerate: inpainting."""
    start = self.start_step(strength)
    x_src = jnp.asarray(x_src, jnp.float32)
    if start == self.num_steps:
      return x_src  # strength 0 (or rounding to no step): nothing to do
    keys = self._keys(x_src.shape[0], seed, indices)
    eps = _noise(keys, _START, 0, x_src.shape[1:])
    x = _noised(x_src, eps, self.sigmas[start])
    edit_mask = jnp.ones(x_src.shape[:-1] + (1,), bool) if mask is None else jnp.asarray(mask, bool)
    return self._sample_from(params, x, start, cond, uncond, cfg_scale, x_src, eps, edit_mask, progress)

  def inpaint(self, params, x_src, mask, cond, uncond, *, strength: float = 1.0, cfg_scale: float,
              seed: int = 0, indices=None, progress=None):
    return self.img2img(params, x_src, cond, uncond, strength=strength, cfg_scale=cfg_scale, seed=seed,
                        indices=indices, mask=mask, progress=progress)

  def _flowedit_step(self, n_avg, src_cfg, tar_cfg):
    def make():
      def step(params, z, x_src, keys, i, c_src, c_tar, uncond):
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        dv = jnp.zeros_like(z)
        for k in range(n_avg):  # n_avg is small and static: unrolled
          zs = _noised(x_src, _noise(keys, i, k, z.shape[1:]), s)
          zt = z + zs - x_src
          dv = dv + (self.velocity(params, zt, s, c_tar, uncond, tar_cfg)
                     - self.velocity(params, zs, s, c_src, uncond, src_cfg))
        return z + (s_next - s) * dv / n_avg
      return step
    return self._jit(("flowedit", n_avg, src_cfg, tar_cfg), make)

  def flowedit(self, params, x_src, c_src, c_tar, uncond, *, n_max: int, n_min: int = 0, n_avg: int = 1,
               src_cfg: float, tar_cfg: float, seed: int = 0, indices=None, progress=None):
    """FlowEdit over steps N - n_max .. N - n_min of the grid, then n_min plain sampling steps."""
    n = self.num_steps
    if not 0 <= n_min < n_max <= n:
      raise ValueError(f"FlowEdit needs 0 <= n_min < n_max <= steps ({n}), got n_min={n_min}, n_max={n_max}")
    if n_avg < 1:
      raise ValueError(f"n_avg must be >= 1, got {n_avg}")
    x_src = jnp.asarray(x_src, jnp.float32)
    keys = self._keys(x_src.shape[0], seed, indices)
    step = self._flowedit_step(int(n_avg), float(src_cfg), float(tar_cfg))
    z = x_src
    for i in range(n - n_max, n - n_min):
      z = step(params, z, x_src, keys, jnp.int32(i), c_src, c_tar, uncond)
      _tick(progress)
    if n_min == 0:
      return z
    start = n - n_min
    eps = _noise(keys, _START, 0, x_src.shape[1:])
    x = z + _noised(x_src, eps, self.sigmas[start]) - x_src
    every = jnp.ones(x_src.shape[:-1] + (1,), bool)
    return self._sample_from(params, x, start, c_tar, uncond, tar_cfg, x_src, eps, every, progress)

  def count_steps(self, method: str, *, strength: float = 0.0, n_max: int = 0, n_min: int = 0) -> int:
    """How many progress ticks a call makes (the progress bar's total)."""
    if method == "flowedit":
      return n_max
    return self.num_steps - self.start_step(strength)


def _tick(progress: Optional[Callable]):
  if progress is not None:
    progress()


def to_float(images_uint8) -> jax.Array:
  """uint8 [0, 255] -> float [-1, 1] (samplers.to_uint8 maps it back exactly)."""
  return jnp.asarray(np.asarray(images_uint8), jnp.float32) / 127.5 - 1.0
