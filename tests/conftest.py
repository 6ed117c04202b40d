"""Test configuration: 8 fake CPU devices, and one compilation cache per run.

XLA reads the device flag when JAX initializes its backend, so it is set
here, before any test module imports JAX. Many tests compile the same
programs (a training step trained, killed and resumed in fresh processes,
two launches of a multi-process run); a persistent compilation cache shared
by the run's workers and subprocesses (environment variables they inherit)
compiles each of them once. It starts empty and is deleted when the run
ends, so every run compiles from scratch.
"""

import io
import os
import shutil
import tarfile
import tempfile

import pytest

# The test programs are tiny and each is compiled once: LLVM's optimization
# of the CPU code costs more time than it saves (about 10% of the suite).
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The controller of an xdist run (or a run without workers) sets the
# directory; its workers and their subprocesses inherit the variables.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    tempfile.gettempdir(), f"mabn_jax_tests_xla_cache_{os.getpid()}"
  )
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def write_cifar_tarball(path: str, per_class=(2, 1), seed: int = 0) -> None:
  """A tiny CIFAR-10 JPEG tarball in the layout of ``../shared/data/cifar10``:
  ``per_class`` random train/test images per class."""
  import numpy as np
  from PIL import Image

  from experiments import data as D

  rng = np.random.default_rng(seed)
  with tarfile.open(path, "w:gz") as archive:
    for split, count in zip(("train", "test"), per_class, strict=True):
      for cls in D.CIFAR10_CLASSES:
        for i in range(count):
          buf = io.BytesIO()
          Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
          info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{i:04d}.jpg")
          info.size = buf.tell()
          buf.seek(0)
          archive.addfile(info, buf)


@pytest.fixture
def tiny_tarball(tmp_path):
  """Path of a :func:`write_cifar_tarball` tarball (2 train, 1 test image per class)."""
  path = str(tmp_path / "cifar10-jpeg.tar.gz")
  write_cifar_tarball(path)
  return path
