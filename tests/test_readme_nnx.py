"""The README's Flax NNX example runs as written and trains."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _nnx_example() -> str:
  text = README.read_text()
  section = text[text.index("### Flax NNX"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_nnx_optimizer_example_runs_and_feeds_the_backward_statistic():
  code = _nnx_example()
  assert "nnx.Optimizer" in code and "mj.nnx.value_and_grad" in code
  namespace: dict = {}
  exec(compile(code, str(README), "exec"), namespace)
  model = namespace["model"]
  assert int(model.norm.step[...]) == 1
  assert np.isfinite(float(namespace["loss"]))
  assert np.abs(np.asarray(model.norm.psi_buffer[...])).max() > 0
  assert namespace["out"].shape == (8, 32, 32, 16)
  assert model.norm.use_running_average is True
