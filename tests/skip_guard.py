"""A pytest plugin that fails the run when a test skips outside an allowed list.

A skipped test is an untested feature that CI would otherwise report as green: a missing data set,
an optional package that did not install. Only the tests in ALLOWED may skip (opt-in checks that
need something CI cannot have). PIXELDIT_ALLOW_SKIPS=1 turns the check off for a local run on a
partial install. tests/conftest.py registers it; tests/test_package.py tests it.
"""

from __future__ import annotations

import os
import re

import pytest

# nodeid without parameters -> why it may skip
ALLOWED = {
    "tests/test_import_official.py::test_t2i_matches_official_torch_module":
        "opt-in parity with the official code (set PIXELDIT_OFFICIAL_SRC to a checkout)",
}
ENV = "PIXELDIT_ALLOW_SKIPS"


def _reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
    return str(longrepr[2])
  return str(longrepr)


class SkipGuard:
  """Collects skips (test and collection reports) and fails the session on unexpected ones."""

  def __init__(self, allowed):
    self.allowed = set(allowed)
    self.unexpected: list[tuple[str, str]] = []

  def _check(self, report):
    if not report.skipped or hasattr(report, "wasxfail"):  # xfail reports also count as skipped
      return
    if re.sub(r"\[.*\]$", "", report.nodeid) not in self.allowed:
      self.unexpected.append((report.nodeid, _reason(report)))

  def pytest_runtest_logreport(self, report):
    self._check(report)

  def pytest_collectreport(self, report):  # module-level skips (importorskip, allow_module_level)
    self._check(report)

  @pytest.hookimpl(trylast=True)
  def pytest_sessionfinish(self, session):
    if self.unexpected and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
      session.exitstatus = pytest.ExitCode.TESTS_FAILED

  def pytest_terminal_summary(self, terminalreporter):
    if not self.unexpected:
      return
    terminalreporter.section("unexpected skips", sep="=", red=True, bold=True)
    for nodeid, reason in self.unexpected:
      terminalreporter.line(f"{nodeid}: {reason}")
    terminalreporter.line(f"{len(self.unexpected)} test(s) skipped outside the allowed list in "
                          f"tests/skip_guard.py, so the run fails ({ENV}=1 permits skips).", red=True)


def register(config, allowed=None):
  if not os.environ.get(ENV):
    config.pluginmanager.register(SkipGuard(ALLOWED if allowed is None else allowed), "skip_guard")
