"""A ``jax.profiler`` trace of a few training steps, into ``<workdir>/profile/`` for TensorBoard.

``config.train.profile``: ``start_step`` (how many steps are done when the trace starts) and
``num_steps`` (how many it records; 0 is off). ``tensorboard --logdir <workdir>`` shows it in the
Profile tab (``pip install tensorboard-plugin-profile``); the files are
``profile/plugins/profile/<run>/<host>.xplane.pb``.

clu.periodic_actions.Profile drives the trace where clu's periodic_actions imports (it needs
TensorFlow), else jax.profiler.start_trace/stop_trace are called directly. The trace is written
to a local directory (the profiler writes ``gs://`` only through TensorFlow) and, for a remote
workdir, copied there through the path layer when it stops.
"""

from __future__ import annotations

import contextlib
import logging

import jax

from pixeldit_jax import fs, logs
from pixeldit_jax.train import metrics as metrics_lib


class _JaxProfile:
  """clu.periodic_actions.Profile's step logic for when clu's periodic_actions does not import."""

  def __init__(self, logdir: str, first_profile: int, num_profile_steps: int):
    self._logdir, self._first, self._num = logdir, first_profile, num_profile_steps
    self._started_at = None

  def __call__(self, step: int) -> None:
    if self._started_at is None and step == self._first:
      jax.profiler.start_trace(self._logdir)
      self._started_at = step
    elif self._started_at is not None and step >= self._started_at + self._num:
      jax.profiler.stop_trace()
      self._started_at = None


class StepProfiler:
  """Call with the number of steps done: once before the first step, then after every step."""

  def __init__(self, workdir: str, start_step: int, num_steps: int, first_step: int,
               enabled: bool = True):
    self.start, self.num = int(start_step), int(num_steps)
    self.active = enabled and self.num > 0
    self.done = self._running = False
    self._quiet = None  # the fd-2 redirect while tracing
    if not self.active:
      return
    if self.start < first_step:
      logging.warning("Not profiling: config.train.profile.start_step %d is before this run's "
                      "first step %d.", self.start, first_step)
      self.active = False
      return
    self.target = fs.join(fs.resolve(workdir), "profile")
    self._mirror = fs.LocalMirror(self.target, prefix="pixeldit_profile_")
    actions = metrics_lib.clu_periodic_actions()
    if actions is not None:
      self._action = actions.Profile(logdir=self._mirror.local, num_profile_steps=self.num,
                                     profile_duration_ms=None, first_profile=self.start,
                                     every_secs=None)
    else:
      self._action = _JaxProfile(self._mirror.local, self.start, self.num)
    self.backend = "clu" if actions is not None else "jax.profiler"

  def __call__(self, done: int, outputs=None) -> None:
    """`outputs` (the last step's results) is waited for before the trace stops, so that the
    traced steps have run, not only been dispatched."""
    if not self.active or self.done:
      return
    if done == self.start:
      self._running = True
      logs.console("Profiling steps %d-%d into %s", self.start + 1, self.start + self.num, self.target)
    stopping = done == self.start + self.num
    if stopping and outputs is not None:
      jax.block_until_ready(outputs)
    if done == self.start:
      # Native profiler chatter (its own threads write to fd 2 while tracing, more so with libtpu
      # installed) goes to log.txt until the trace stops, not to the console.
      self._quiet = contextlib.ExitStack()
      self._quiet.enter_context(logs.native_stderr_to_file())
    try:
      self._action(done)
    finally:
      if stopping:
        self._unquiet()
    if stopping:
      self._mirror.close()
      self.done, self._running = True, False
      logs.console("Profile written to %s (TensorBoard: Profile tab)", self.target)

  def _unquiet(self) -> None:
    if self._quiet is not None:
      self._quiet.close()
      self._quiet = None

  def close(self) -> None:
    """A run that ends inside the window stops the trace and keeps what it recorded."""
    if self.active and not self.done:
      if self._running:
        try:
          jax.profiler.stop_trace()  # what both drivers call to stop
        except RuntimeError as e:
          logging.warning("Could not stop the profiler trace: %s", e)
      self._unquiet()
      self._mirror.close()
      self.done = True
