"""Tests for the segmentation experiment: data, U-Net, metrics, CLI, fine-tuning.

Everything runs on tiny data the tests make: random source images for the
composite builder, a tiny CIFAR-10 JPEG tarball for the command line, and a
tiny ``oxford_iiit_pet`` prepared with its registered tfds builder (only the
example generator replaced; no download, no tensorflow).
"""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mabn_jax as mj
from experiments import data as D
from experiments import segmentation as S
from experiments.tasks.segmentation import data as SD
from experiments.tasks.segmentation import metrics as SM
from experiments.tasks.segmentation import models as SMod


def _cifar_like(n_train=40, n_test=12, seed=0):
  """``{'train', 'test'}`` Splits of random 32x32 images; test images are odd-valued
  and training images even-valued, so a pasted patch reveals its split."""
  rng = np.random.default_rng(seed)
  make = lambda n, parity: D.Split(
    (rng.integers(0, 128, (n, 32, 32, 3)) * 2 + parity).astype(np.uint8),
    rng.integers(0, 10, n).astype(np.int32),
  )
  return {"train": make(n_train, 0), "test": make(n_test, 1)}


def _expected(split: SD.SegSplit, images: np.ndarray, labels: np.ndarray, n: int):
  """Canvas and mask of canvas ``n`` recomputed from its recorded sources and positions."""
  size = split.images.shape[1]
  mask = np.zeros((size, size), np.int32)
  canvas = split.images[n].copy()
  for src, (top, left) in zip(split.sources[n], split.positions[n], strict=True):
    if src < 0:
      continue
    mask[top : top + 32, left : left + 32] = labels[src] + 1
    canvas[top : top + 32, left : left + 32] = images[src]
  return canvas, mask


# --------------------------------------------------------------------------
# The composite builder.


def test_composite_labels_cover_exactly_the_pasted_images_and_background_elsewhere():
  src = _cifar_like()["train"]
  split = SD.composite_split(
    src.images, src.labels, np.arange(len(src)), 12, 64, objects=(2, 4), seed=3
  )
  assert split.images.shape == (12, 64, 64, 3) and split.masks.shape == (12, 64, 64)
  for n in range(12):
    used = split.sources[n] >= 0
    assert 2 <= used.sum() <= 4 and len(set(split.sources[n][used])) == used.sum()
    canvas, mask = _expected(split, src.images, src.labels, n)
    # Later-pasted images win: the recorded paste order reproduces labels and pixels.
    np.testing.assert_array_equal(split.masks[n], mask)
    np.testing.assert_array_equal(split.images[n], canvas)
    covered = np.zeros((64, 64), bool)
    for top, left in split.positions[n][used]:
      covered[top : top + 32, left : left + 32] = True
    assert np.array_equal(split.masks[n] > 0, covered)
    background = split.images[n][~covered]
    assert len(background) and (background == background[0, 0]).all()  # one plain grey


def test_composite_splits_use_only_their_own_source_images():
  cifar = _cifar_like()
  ds = SD.load_cifar_composite(
    48, num_train=10, num_val=6, num_test=8, objects=(2, 3), val_images=10, cifar=cifar
  )
  train_pool, val_pool = D.hold_out(40, 10)
  used = lambda split: set(split.sources[split.sources >= 0].tolist())
  assert used(ds.train) <= set(train_pool.tolist())
  assert used(ds.val) <= set(val_pool.tolist())
  assert not used(ds.train) & used(ds.val)
  for split, src in (
    (ds.train, cifar["train"]),
    (ds.val, cifar["train"]),
    (ds.test, cifar["test"]),
  ):
    for n in range(len(split)):
      canvas, mask = _expected(split, src.images, src.labels, n)
      np.testing.assert_array_equal(split.images[n], canvas)
      np.testing.assert_array_equal(split.masks[n], mask)
  # Test canvases show only test images: every labelled pixel is odd-valued.
  assert (ds.test.images[ds.test.masks > 0] % 2 == 1).all()
  assert (ds.train.images[ds.train.masks > 0] % 2 == 0).all()
  assert ds.num_classes == 11 and ds.class_names[0] == "background"


def test_composite_canvases_are_deterministic_given_the_seed():
  cifar = _cifar_like()
  a, b = (SD.load_cifar_composite(40, 6, 2, 4, val_images=8, seed=5, cifar=cifar) for _ in range(2))
  c = SD.load_cifar_composite(40, 6, 2, 4, val_images=8, seed=6, cifar=cifar)
  for name in ("train", "val", "test"):
    x, y = getattr(a, name), getattr(b, name)
    for field in ("images", "masks", "sources", "positions"):
      np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
  assert not np.array_equal(a.train.images, c.train.images)


# --------------------------------------------------------------------------
# Oxford-IIIT Pet through tfds.


def _png(array):
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  buf.seek(0)
  return buf


def _prepare_pets(data_dir: str, sizes=None, seed: int = 0):
  """Prepares a tiny ``oxford_iiit_pet``; returns {split: [(name, image, trimap)]}."""
  tfds = pytest.importorskip("tensorflow_datasets")
  sizes = sizes or {"train": 5, "test": 3}
  rng = np.random.default_rng(seed)
  truth = {split: [] for split in sizes}
  for split, count in sizes.items():
    for i in range(count):
      shape = (20 + 3 * i, 28 - 2 * i)  # varied sizes and aspect ratios
      truth[split].append(
        (
          f"{split}_{i:02d}.jpg",
          rng.integers(0, 256, shape + (3,), dtype=np.uint8),
          rng.integers(1, 4, shape, dtype=np.uint8),
        )
      )

  class Tiny(tfds.builder_cls("oxford_iiit_pet"), skip_registration=True):
    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._examples(split) for split in sizes}

    def _examples(self, split):
      for i, (name, image, trimap) in enumerate(truth[split]):
        yield (
          name,
          {
            "image": _png(image),
            "label": i % 37,
            "species": i % 2,
            "file_name": name,
            "segmentation_mask": _png(trimap),
            "head_bbox": tfds.features.BBox(0.1, 0.2, 0.5, 0.6),
          },
        )

  Tiny.name = "oxford_iiit_pet"  # the registered name: files land where tfds.builder looks
  Tiny(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return truth


@pytest.mark.parametrize("mapping", ["trimap", "binary"])
def test_oxford_pets_are_resized_and_trimaps_mapped(mapping, tmp_path):
  truth = _prepare_pets(str(tmp_path))
  ds = SD.load_oxford_pets(str(tmp_path), image_size=16, mapping=mapping)
  assert ds.train.images.shape == (5, 16, 16, 3) and ds.train.images.dtype == np.uint8
  assert ds.test.masks.shape == (3, 16, 16) and ds.test.masks.dtype == np.int32
  assert ds.num_classes == (3 if mapping == "trimap" else 2)
  for split, loaded in (("train", ds.train), ("test", ds.test)):
    for n, (_, image, trimap) in enumerate(sorted(truth[split], key=lambda r: r[0])):
      img, tri = SD.resize_pair(image, trimap, 16)  # loaded in file-name order
      np.testing.assert_array_equal(loaded.images[n], img)
      expected = {"trimap": {1: 1, 2: 0, 3: 2}, "binary": {1: 1, 2: 0, 3: SD.IGNORE}}[mapping]
      np.testing.assert_array_equal(loaded.masks[n], np.vectorize(expected.get)(tri))


def test_oxford_pets_validation_is_held_out_from_train(tmp_path):
  _prepare_pets(str(tmp_path))
  full = SD.load_oxford_pets(str(tmp_path), image_size=8)
  ds = SD.load_oxford_pets(str(tmp_path), image_size=8, val_size=2)
  assert len(ds.train) == 3 and len(ds.val) == 2
  rows = lambda split: {x.tobytes() for x in split.images}
  assert rows(ds.train) | rows(ds.val) == rows(full.train)
  assert not rows(ds.train) & rows(ds.val)


def test_oxford_pets_not_prepared_is_a_clear_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match="not prepared"):
    SD.load_oxford_pets(str(tmp_path / "empty"))


# --------------------------------------------------------------------------
# The encoder-decoder with every normalizer.


@pytest.mark.parametrize("norm", mj.normalizer_names())
def test_unet_forward_and_one_training_step_with_every_normalizer(norm):
  widths, classes = (4, 8), 3
  model = SMod.UNet(SMod.segmentation_normalizer(norm, 2, widths, gn_groups=2), classes, widths)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  y = jax.random.randint(jax.random.PRNGKey(1), (4, 8, 8), 0, classes)
  variables = model.init(jax.random.PRNGKey(0), x, train=True)
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (4, 8, 8, classes) and logits.dtype == jnp.float32
  if norm == "mabn":
    assert mj.BACKWARD_STATS in variables
    assert "conv" in variables["params"]["down1"]["conv1"]
  tx = optax.sgd(0.1, momentum=0.9)
  train_step, _ = S.step_functions(model, tx, classes)
  before = jax.tree_util.tree_map(np.asarray, variables["params"])
  batch = {"image": x, "label": y}
  new, _, metrics = jax.jit(train_step)(variables, tx.init(variables["params"]), batch)
  assert np.isfinite(float(metrics["loss"]))
  changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), before, new["params"])
  flat = dict(jax.tree_util.tree_leaves_with_path(changed))
  # Frozen BN's affine map is fixed; every other parameter trains.
  frozen = {
    path
    for path in flat
    if norm == "frozen_bn"
    and any(getattr(key, "key", None) in ("norm", "norm_final") for key in path)
  }
  assert all(flat[path] for path in flat if path not in frozen)
  assert not any(flat[path] for path in frozen)


def test_unet_rejects_sides_not_divisible_by_its_downsampling():
  model = SMod.UNet(mj.make_normalizer("none"), 2, (4, 8, 16))
  with pytest.raises(ValueError, match="divisible by 4"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)), train=True)


def test_group_count_divides_every_width():
  assert SMod.group_count((16, 32, 64), 8) == 8
  assert SMod.group_count((4, 8), 8) == 4
  assert SMod.group_count((6, 12), 4) == 3


# --------------------------------------------------------------------------
# Metrics.


def test_miou_and_pixel_accuracy_match_a_hand_computed_case():
  labels = jnp.asarray([[0, 0, 1], [1, 2, SD.IGNORE]])
  preds = jnp.asarray([[0, 1, 1], [1, 1, 0]])
  cm = np.asarray(SM.confusion_matrix(labels, preds, 4))  # class 3: nowhere
  np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
  assert SM.pixel_accuracy(cm) == pytest.approx(3 / 5)  # the ignored pixel is not counted
  # IoU: class 0: 1 / (2 + 1 - 1); class 1: 2 / (2 + 4 - 2); class 2: 0 / 1; class 3 absent.
  iou = SM.class_iou(cm)
  np.testing.assert_allclose(iou[:3], [0.5, 0.5, 0.0])
  assert np.isnan(iou[3])
  assert SM.mean_iou(cm) == pytest.approx(1 / 3)


def test_confusion_matrices_of_batches_add_up_to_the_whole_split():
  rng = np.random.default_rng(0)
  labels, preds = rng.integers(0, 5, (6, 4, 4)), rng.integers(0, 5, (6, 4, 4))
  whole = SM.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 5)
  parts = sum(
    SM.confusion_matrix(jnp.asarray(labels[i : i + 2]), jnp.asarray(preds[i : i + 2]), 5)
    for i in range(0, 6, 2)
  )
  np.testing.assert_array_equal(whole, parts)
  assert int(whole.sum()) == labels.size


def test_pixel_cross_entropy_leaves_out_ignored_pixels():
  logits = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 2, 3))
  labels = jnp.asarray([[[0, 2], [SD.IGNORE, 1]]])
  kept = optax.softmax_cross_entropy_with_integer_labels(
    logits.reshape(4, 3)[jnp.asarray([0, 1, 3])], jnp.asarray([0, 2, 1])
  ).mean()
  np.testing.assert_allclose(S.pixel_cross_entropy(logits, labels), kept, rtol=1e-6)


def test_learning_rate_scales_linearly_from_the_reference_batch():
  assert S.preset("seg_cpu", batch_size=2).peak_lr() == pytest.approx(0.1 * 2 / 16)
  assert S.preset("seg_cpu", batch_size=16).peak_lr() == pytest.approx(0.1)
  # The same epochs at every batch: 8x the steps at batch 2.
  assert S.preset("seg_cpu", batch_size=2).total_steps(2000 // 2) == 8 * S.preset(
    "seg_cpu", batch_size=16
  ).total_steps(2000 // 16)


# --------------------------------------------------------------------------
# The command line and fine-tuning.


def _cli(tmp_path, tarball, *extra):
  return [
    "--preset",
    "seg_quick",
    "--steps",
    "2",
    "--seeds",
    "0",
    "--batch_size",
    "2",
    "--widths",
    "4,8",
    "--num_examples",
    "2",
    "--out_dir",
    str(tmp_path / "out"),
    "--tarball",
    tarball,
    "--cache_dir",
    str(tmp_path / "cache"),
    *extra,
  ]


def _json_lines(text: str):
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cli_writes_table_plot_examples_and_json_and_a_rerun_skips_finished_runs(
  tmp_path, tiny_tarball, capsys
):
  args = _cli(tmp_path, tiny_tarball, "--norms", "mabn", "--no_reference")
  assert S.main(args) == 0
  lines = _json_lines(capsys.readouterr().out)
  assert [(l["run"], l["skipped"]) for l in lines] == [("mabn_b2_s0", False)]
  out = tmp_path / "out"
  summary = json.loads((out / "runs" / "mabn_b2_s0.json").read_text())
  assert summary["finished"] and summary["steps"] == 2 and summary["batch_size"] == 2
  assert 0.0 <= summary["test_miou"] <= 1.0 and 0.0 <= summary["test_pixel_acc"] <= 1.0
  assert summary["peak_lr"] == pytest.approx(0.1 * 2 / 16)
  table = (out / "table.md").read_text()
  assert "| mabn | 2 |" in table and "±" in table
  for png in (out / "plot.png", out / "examples" / "mabn_b2_s0.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  stamp = os.path.getmtime(out / "runs" / "mabn_b2_s0.json")
  assert S.main(args) == 0
  lines = _json_lines(capsys.readouterr().out)
  assert [(l["run"], l["skipped"]) for l in lines] == [("mabn_b2_s0", True)]
  assert os.path.getmtime(out / "runs" / "mabn_b2_s0.json") == stamp
  assert "| mabn | 2 |" in (out / "table.md").read_text()
  with pytest.raises(ValueError, match="other settings"):  # same name, other settings
    S.main(args + ["--lr", "0.2"])


def test_plan_puts_the_bn_reference_first_and_finetunes_at_the_small_batches():
  specs = S.plan_runs(["bn", "mabn"], [2, 16], [0, 1], 16, reference=True, finetune=True)
  names = [s.name for s in specs]
  assert names[:5] == ["bn_b16_s0", "bn_b2_s0", "mabn_b2_s0", "mabn_b16_s0", "ft_mabn_b2_s0"]
  assert "ft_mabn_b16_s0" not in names and len(names) == len(set(names)) == 12
  assert [
    s.name
    for s in S.plan_runs(
      ["gn"],
      [2],
      [0],
      16,
      reference=False,
      finetune=True,
      pretrained=True,
      finetune_methods=["ft_mabn"],
    )
  ] == ["gn_b2_s0", "ft_mabn_b2_s0"]


def _bn_checkpoint(path: str, widths=(4, 8), classes=11, size=40):
  """A BN U-Net's variables with non-trivial running statistics, saved to ``path``."""
  model = SMod.UNet(mj.make_normalizer("bn"), classes, widths)
  variables = jax.tree_util.tree_map(
    np.asarray, model.init(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=True)
  )
  rng = np.random.default_rng(0)
  stats = jax.tree_util.tree_map(
    lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), variables["batch_stats"]
  )
  variables = {**variables, "batch_stats": stats}
  S.save_variables(path, variables)
  return variables


def test_finetune_start_converts_bn_statistics_into_mabn_state(tmp_path):
  bn_vars = _bn_checkpoint(str(tmp_path / "bn.msgpack"))
  loaded = S.load_variables(str(tmp_path / "bn.msgpack"))
  spec = S.RunSpec("ft_mabn", 2, 0)
  base = S.preset("seg_quick", widths=(4, 8))
  config, variables, normalizer = S.finetune_start(spec, base, loaded)
  assert normalizer.name == "mabn" and config.norm == "mabn" and config.batch_size == 2
  bn = bn_vars["batch_stats"]["down1"]["conv1"]["norm"]
  mabn = variables["batch_stats"]["down1"]["conv1"]["norm"]
  np.testing.assert_allclose(mabn["chi_ema"], bn["var"] + bn["mean"] ** 2, rtol=1e-6)
  np.testing.assert_array_equal(
    variables["params"]["head"]["kernel"], bn_vars["params"]["head"]["kernel"]
  )
  assert mj.BACKWARD_STATS in variables
  config, same, normalizer = S.finetune_start(S.RunSpec("ft_bn", 2, 0), base, loaded)
  assert normalizer.name == "bn" and same is loaded


def test_finetune_start_freezes_the_bn_checkpoint_for_ft_frozen_bn(tmp_path):
  bn_vars = _bn_checkpoint(str(tmp_path / "bn.msgpack"))
  loaded = S.load_variables(str(tmp_path / "bn.msgpack"))
  base = S.preset("seg_quick", widths=(4, 8))
  spec = S.RunSpec("ft_frozen_bn", 2, 0)
  assert spec.finetune
  config, variables, normalizer = S.finetune_start(spec, base, loaded)
  assert normalizer.name == "frozen_bn" and config.norm == "frozen_bn"
  bn = bn_vars["batch_stats"]["down1"]["conv1"]["norm"]
  frozen = variables["batch_stats"]["down1"]["conv1"]["norm"]
  np.testing.assert_array_equal(frozen["mean"], bn["mean"])
  np.testing.assert_array_equal(frozen["var"], bn["var"])


@pytest.mark.parametrize("method, norm", [("ft_mabn", "mabn"), ("ft_frozen_bn", "frozen_bn")])
def test_cli_finetunes_a_bn_checkpoint_at_batch_2(tmp_path, tiny_tarball, capsys, method, norm):
  _bn_checkpoint(str(tmp_path / "bn.msgpack"))
  args = _cli(
    tmp_path,
    tiny_tarball,
    "--norms",
    "",
    "--no_reference",
    "--finetune",
    "--finetune_methods",
    method,
    "--pretrained",
    str(tmp_path / "bn.msgpack"),
  )
  assert S.main(args) == 0
  lines = _json_lines(capsys.readouterr().out)
  assert [l["run"] for l in lines] == [f"{method}_b2_s0"]
  summary = json.loads((tmp_path / "out" / "runs" / f"{method}_b2_s0.json").read_text())
  assert summary["finished"] and summary["norm"] == norm and summary["steps"] == 2
  assert np.isfinite(summary["final_train_loss"])
  assert f"| {method} | 2 |" in (tmp_path / "out" / "table.md").read_text()
