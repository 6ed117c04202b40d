"""The README's linen and Flax NNX examples, and the getting-started page's
functional one, run as written and train."""

from __future__ import annotations

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting_started.md"


def _example(heading: str, page: pathlib.Path = README) -> str:
  """The first python block after ``heading`` on ``page``."""
  text = page.read_text()
  section = text[text.index(heading) :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str) -> dict:
  namespace: dict = {}
  exec(compile(code, str(README), "exec"), namespace)
  return namespace


def test_readme_linen_example_runs_and_feeds_the_backward_statistic():
  code = _example("## Usage")
  assert "mj.value_and_grad" in code and 'mutable=["batch_stats"]' in code
  namespace = _run(code)
  stats = namespace["variables"]["batch_stats"]["MABN_0"]
  assert int(stats["step"]) == 1
  assert np.isfinite(float(namespace["loss"]))
  assert np.abs(np.asarray(stats["psi_buffer"])).max() > 0  # written back by the contract
  assert namespace["out"].shape == (8, 32, 32, 16)


def test_readme_nnx_optimizer_example_runs_and_feeds_the_backward_statistic():
  code = _example("### Flax NNX")
  assert "nnx.Optimizer" in code and "mj.nnx.value_and_grad" in code
  namespace = _run(code)
  model = namespace["model"]
  assert int(model.norm.step[...]) == 1
  assert np.isfinite(float(namespace["loss"]))
  assert np.abs(np.asarray(model.norm.psi_buffer[...])).max() > 0
  assert namespace["out"].shape == (8, 32, 32, 16)
  assert model.norm.use_running_average is True


def test_readme_functional_example_runs_and_feeds_the_backward_statistic():
  code = _example("## Without Flax", GETTING_STARTED)
  assert "method.train" in code and "method.taps" in code
  namespace = _run(code)
  state = namespace["state"]
  assert int(state.step) == 1
  assert np.abs(np.asarray(state.psi_buffer)).max() > 0
  assert namespace["y_eval"].shape == (8, 16)
  assert np.all(np.isfinite(np.asarray(namespace["grad_x"])))
