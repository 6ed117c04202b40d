"""Tests for experiments/data/ on data the tests build themselves."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from experiments import data as D


def _write_tarball(path, n_per_class=(3, 2), classes=D.CIFAR10_CLASSES[:3], seed=0):
  """A tiny CIFAR-style JPEG tarball; returns {split: {(label, fname): pixels}}."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  truth = {"train": {}, "test": {}}
  with tarfile.open(path, "w:gz") as tar:
    # Archive order deliberately not sorted (as in the real tarball).
    for split, count in zip(("train", "test"), n_per_class, strict=True):
      for label in reversed(range(len(classes))):
        for k in reversed(range(count)):
          pixels = np.full((32, 32, 3), 40 * label + 10 * k, np.uint8)
          pixels[::4] = rng.integers(0, 255, (8, 32, 3), dtype=np.uint8)
          buf = io.BytesIO()
          Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
          info = tarfile.TarInfo(f"cifar/{split}/{classes[label]}/{k:04d}.jpg")
          info.size = buf.tell()
          buf.seek(0)
          tar.addfile(info, buf)
          with Image.open(io.BytesIO(buf.getvalue())) as img:
            truth[split][(label, f"{k:04d}.jpg")] = np.asarray(img.convert("RGB"))
  return truth


@pytest.fixture
def tarball(tmp_path):
  path = str(tmp_path / "tiny.tar.gz")
  return path, _write_tarball(path)


def test_tarball_reader_decodes_every_image_in_canonical_order(tarball, tmp_path):
  path, truth = tarball
  splits = D.load_cifar10_jpeg_arrays(path, str(tmp_path / "cache"))
  for split in ("train", "test"):
    keys = sorted(truth[split])
    assert len(splits[split]) == len(keys)
    np.testing.assert_array_equal(splits[split].labels, [k[0] for k in keys])
    for i, key in enumerate(keys):
      np.testing.assert_array_equal(splits[split].images[i], truth[split][key])
  assert splits["train"].images.dtype == np.uint8


def test_tarball_cache_is_reused_and_identical(tarball, tmp_path):
  path, _ = tarball
  cache = str(tmp_path / "cache")
  first = D.load_cifar10_jpeg_arrays(path, cache)
  npy = [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".npy")]
  assert len(npy) == 4
  # A second load must come from the cache: make the tarball unreadable content-wise
  # while keeping its size and mtime (the cache key).
  st = os.stat(path)
  with open(path, "r+b") as f:
    f.write(b"\0" * 16)
  os.utime(path, (st.st_atime, st.st_mtime))
  second = D.load_cifar10_jpeg_arrays(path, cache)
  np.testing.assert_array_equal(first["train"].images, second["train"].images)
  np.testing.assert_array_equal(first["test"].labels, second["test"].labels)


def test_tfds_builder_matches_direct_reader(tarball, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  path, _ = tarball
  direct = D.load_cifar10_jpeg_arrays(path, str(tmp_path / "cache_a"))
  via = D.load_cifar10_jpeg_tfds(path, str(tmp_path / "tfds"), str(tmp_path / "cache_b"))
  for split in ("train", "test"):
    np.testing.assert_array_equal(via[split].images, direct[split].images)
    np.testing.assert_array_equal(via[split].labels, direct[split].labels)
  builder = D.cifar10_jpeg_builder(path, str(tmp_path / "tfds"))
  assert builder.info.splits["train"].num_examples == 9
  assert builder.info.features["label"].names[:3] == list(D.CIFAR10_CLASSES[:3])


def test_digits_default_dataset_shapes_and_split():
  ds = D.load_digits()
  assert ds.train.images.shape[1:] == (16, 16, 1)
  assert len(ds.train) + len(ds.test) == 1797
  assert ds.num_classes == 10 and not ds.flip
  assert ds.train.images.max() == 255


def test_digits8_is_digits_at_native_resolution_with_the_same_split():
  native, upsampled = D.load_dataset("digits8"), D.load_digits()
  assert native.name == "digits8" and native.train.images.shape[1:] == (8, 8, 1)
  for a, b in ((native.train, upsampled.train), (native.test, upsampled.test)):
    np.testing.assert_array_equal(a.images, b.images[:, ::2, ::2])
    np.testing.assert_array_equal(a.labels, b.labels)


def test_channel_stats_match_numpy():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
  mean, std = D.channel_stats(x, chunk=7)
  ref = x.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, ref.std(0), rtol=1e-4)


def test_loader_is_deterministic_and_resumable():
  ds = D.synthetic(n_train=40, n_test=10)
  a = D.Loader(ds, "train", 8, True, seed=3)
  full = list(a.epoch(1))
  again = list(D.Loader(ds, "train", 8, True, seed=3).epoch(1, start=2))
  assert len(full) == 5
  for x, y in zip(full[2:], again, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  other = list(D.Loader(ds, "train", 8, True, seed=4).epoch(1))
  assert not np.array_equal(full[0]["label"], other[0]["label"]) or not np.array_equal(
    full[0]["image"], other[0]["image"]
  )
  # Different epochs shuffle differently.
  e0 = np.concatenate([b["label"] for b in a.epoch(0)])
  e1 = np.concatenate([b["label"] for b in full])
  assert sorted(e0.tolist()) == sorted(e1.tolist())


def test_host_shards_are_disjoint_and_cover_the_epoch():
  ds = D.synthetic(n_train=48, n_test=10)
  seen = []
  for host in range(3):
    loader = D.Loader(ds, "train", 4, True, seed=0, shard_index=host, shard_count=3)
    assert loader.steps_per_epoch == 4
    seen.append(loader._indices(0))
  allids = np.concatenate(seen)
  assert len(set(allids.tolist())) == 48


def test_eval_loader_pads_last_batch_with_mask():
  ds = D.synthetic(n_train=16, n_test=10)
  batches = list(D.Loader(ds, "test", 4, False).epoch(0))
  assert len(batches) == 3
  assert batches[-1]["mask"].tolist() == [1, 1, 0, 0]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:10], ds.test.labels)


def test_augmentation_crop_and_flip():
  rng = np.random.default_rng(0)
  x = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1) + 1
  y = D.random_crop_flip(x, rng, pad=0, flip=True)
  for i in range(2):
    assert np.array_equal(y[i], x[i]) or np.array_equal(y[i], x[i, :, ::-1])
  z = D.random_crop_flip(x, np.random.default_rng(1), pad=2, flip=False)
  assert z.shape == x.shape
  # Every crop is a shifted window of the zero-padded image.
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(2):
    assert any(
      np.array_equal(z[i], padded[i, a : a + 4, b : b + 4]) for a in range(5) for b in range(5)
    )


def test_normalize_per_channel():
  ds = D.synthetic(n_train=64, n_test=8)
  x = D.normalize(ds.train.images, ds.mean, ds.std)
  np.testing.assert_allclose(x.reshape(-1, 3).mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(x.reshape(-1, 3).std(0), 1, atol=1e-3)


def test_prefetch_propagates_worker_errors():
  def make(step):
    if step == 2:
      raise RuntimeError("boom")
    return {"step": step}

  it = D.prefetch(make, range(5), 2)
  assert next(it)["step"] == 0
  assert next(it)["step"] == 1
  with pytest.raises(RuntimeError, match="boom"):
    next(it)


def test_unknown_dataset_and_unprepared_tfds_raise(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset"):
    D.load_dataset("mnist_typo")
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match="not prepared"):
    D.load_dataset("cifar10", data_dir=str(tmp_path))


def test_validation_split_is_disjoint_deterministic_and_keeps_the_training_subset():
  train_idx, val_idx = D.hold_out(100, 20, 50)
  assert len(train_idx) == 50 and len(val_idx) == 20
  assert not set(train_idx) & set(val_idx)
  again = D.hold_out(100, 20, 50)
  np.testing.assert_array_equal(again[0], train_idx)
  np.testing.assert_array_equal(again[1], val_idx)
  # The training subset is the one Split.subset takes without validation.
  split = D.Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), np.arange(100))
  np.testing.assert_array_equal(split.subset(50).labels, train_idx)
  with pytest.raises(ValueError, match="cannot hold out 60"):
    D.hold_out(100, 60, 50)

  plain = D.load_dataset("digits", train_subset=500)
  ds = D.load_dataset("digits", train_subset=500, val_split=200)
  np.testing.assert_array_equal(ds.train.images, plain.train.images)
  np.testing.assert_array_equal(ds.test.labels, plain.test.labels)
  assert len(ds.val) == 200 and plain.val is None
  full = D.load_digits().train
  rows = {im.tobytes() for im in full.images}
  train_rows = {im.tobytes() for im in ds.train.images}
  val_rows = [im.tobytes() for im in ds.val.images]
  assert all(r in rows for r in val_rows)
  assert not train_rows & set(val_rows)
  # Without a subset, the validation images leave the training split.
  ds = D.load_dataset("digits", val_split=100)
  assert len(ds.train) + len(ds.val) == len(full)


def test_indexed_split_views_another_split():
  base = D.Split(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), np.arange(10))
  view = D.IndexedSplit(base, np.array([7, 2, 5]))
  images, labels = view.get(np.array([0, 2]))
  np.testing.assert_array_equal(labels, [7, 5])
  assert len(view) == 3 and view.image_shape == (1, 1, 1)
