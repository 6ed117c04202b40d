"""The task interface: one Config and one loop train classification and segmentation."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data as D
from experiments import segmentation as S
from experiments import train as T
from experiments.loop import loop
from experiments.loop.steps import step_functions
from experiments.loop.task import get_task


def _classification(**kw):
  fields = dict(
    norm="mabn", model="cnn2", width=4, batch_size=8, norm_batch_size=2, epochs=1, eval_every=1
  )
  return T.Config(**{**fields, "progress": False, "log_every": 2, "num_devices": 1, **kw})


def _segmentation(tarball, tmp_path, **kw):
  fields = dict(norm="mabn", widths=(4, 8), steps=4, tarball=tarball)
  return S.preset("seg_quick", **{**fields, "cache_dir": str(tmp_path / "cache"), **kw})


def _same(a, b):
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b))
  return all(leaves) and jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def test_one_loop_trains_both_tasks_and_summarizes_each_tasks_metric(tmp_path, tiny_tarball):
  cls = loop.train(_classification(), D.synthetic(n_train=32, n_test=16))
  seg = loop.train(_segmentation(tiny_tarball, tmp_path))
  assert cls["finished"] and seg["finished"]
  assert 0.0 <= cls["final_test_top1"] <= 100.0
  assert 0.0 <= seg["final_test_miou"] <= 1.0 and 0.0 <= seg["final_test_pixel_acc"] <= 1.0
  assert len(seg["final_test_iou_per_class"]) == 11
  # Segmentation evaluates at the end only (eval_every=0), on val and test.
  assert [s for s, _ in seg["test_miou_curve"]] == [4] and seg["final_val_miou"] is not None
  for s in (cls, seg):
    assert s["train_loss_curve"][-1][0] == s["total_steps"]
    assert s["train_seconds"] > 0 and s["seconds_per_step"] > 0
    assert np.isfinite(s["train_loss_curve"][-1][1])


def test_segmentation_through_the_loop_equals_a_plain_jit_loop(tmp_path, tiny_tarball):
  """The loop adds nothing to the math: the same init, batches, optimizer
  and step written out by hand give bit-identical final variables."""
  config = _segmentation(tiny_tarball, tmp_path)
  task = get_task("segmentation")
  dataset = task.load_data(config)
  trained = loop.train(config, dataset)["variables"]

  loader = task.train_loader(config, dataset, config.batch_size)
  total = config.total_steps(loader.steps_per_epoch)
  model = task.build(config, dataset, total, loader.steps_per_epoch)
  tx = T.optimizer(config, T.learning_rate_schedule(config, loader.steps_per_epoch, total))
  step = jax.jit(step_functions(task.objective(config, model, dataset), tx)[0])
  x = jnp.zeros((config.batch_size,) + dataset.image_shape, jnp.float32)
  variables = dict(model.init(jax.random.PRNGKey(config.seed), x, train=True))
  opt_state = tx.init(variables["params"])
  done, epoch = 0, 0
  while done < total:
    for batch in loader.epoch(epoch):
      variables, opt_state, _ = step(variables, opt_state, batch)
      done += 1
      if done == total:
        break
    epoch += 1
  assert _same(jax.tree_util.tree_map(np.asarray, variables), trained)


def test_segmentation_resumes_from_a_checkpoint_to_the_uninterrupted_result(tmp_path, tiny_tarball):
  config = _segmentation(tiny_tarball, tmp_path, steps=6, checkpoint_every=2)
  dataset = get_task("segmentation").load_data(config)
  whole = loop.train(dataclasses.replace(config, workdir=str(tmp_path / "whole")), dataset)
  cut = dataclasses.replace(config, workdir=str(tmp_path / "cut"), stop_after=3)
  first = loop.train(cut, dataset)
  assert not first["finished"] and first["step"] == 3
  resumed = loop.train(dataclasses.replace(cut, stop_after=0, resume=True), dataset)
  assert resumed["finished"] and _same(resumed["variables"], whole["variables"])
  assert resumed["final_test_miou"] == whole["final_test_miou"]


def test_segmentation_under_pmap_on_one_device_matches_jit(tmp_path, tiny_tarball):
  config = _segmentation(tiny_tarball, tmp_path, norm="bn")
  dataset = get_task("segmentation").load_data(config)
  jit = loop.train(config, dataset)
  pmap = loop.train(dataclasses.replace(config, parallel="pmap", num_devices=1), dataset)
  for a, b in zip(
    jax.tree_util.tree_leaves(jit["variables"]),
    jax.tree_util.tree_leaves(pmap["variables"]),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_segmentation_shard_map_with_synchronized_statistics_equals_jit_on_two_devices(
  tmp_path, tiny_tarball
):
  """Per-device steps with gradients and losses averaged and confusion
  matrices summed over the devices train and evaluate as one program."""
  config = _segmentation(tiny_tarball, tmp_path, norm="bn", num_devices=2)
  dataset = get_task("segmentation").load_data(config)
  jit = loop.train(config, dataset)
  mapped = loop.train(dataclasses.replace(config, parallel="shard_map", sync_stats=True), dataset)
  for a, b in zip(
    jax.tree_util.tree_leaves(jit["variables"]),
    jax.tree_util.tree_leaves(mapped["variables"]),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert mapped["final_test_miou"] == pytest.approx(jit["final_test_miou"], abs=1e-3)
  np.testing.assert_allclose(mapped["train_loss_curve"], jit["train_loss_curve"], rtol=1e-4)


def test_train_command_runs_a_segmentation_preset(tmp_path, tiny_tarball, capsys):
  argv = ["--preset", "seg_quick", "--norm", "mabn", "--steps", "2", "--widths", "4,8"]
  argv += ["--tarball", tiny_tarball, "--cache_dir", str(tmp_path / "cache")]
  argv += ["--workdir", str(tmp_path / "run")]
  assert T.main(argv) == 0
  out = capsys.readouterr().out
  line = json.loads(next(x for x in out.splitlines() if x.startswith("{")))
  assert line["finished"] and 0.0 <= line["final_test_miou"] <= 1.0
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["config"]["task"] == "segmentation" and summary["total_steps"] == 2


def test_unknown_task_and_wrong_model_are_named():
  with pytest.raises(ValueError, match="task 'detection'"):
    T.Config(task="detection").validate()
  with pytest.raises(ValueError, match="unknown task 'detection'"):
    get_task("detection")
  seg = S.preset("seg_quick", model="cnn6")
  with pytest.raises(ValueError, match="segmentation model 'cnn6': expected 'unet'"):
    get_task("segmentation").build(seg, None)
  with pytest.raises(ValueError, match="optimizer 'lamb'"):
    T.Config(optimizer="lamb").validate()


def test_presets_of_both_tasks_share_one_config_and_scale_the_rate_from_the_reference():
  seg, cls = S.preset("seg_cpu", batch_size=2), T.preset("cifar_cpu")
  assert type(seg) is type(cls) is T.Config
  assert seg.task == "segmentation" and cls.task == "classification"
  assert seg.peak_lr() == pytest.approx(0.1 * 2 / 16) and cls.peak_lr() == cls.lr
  small = T.preset("cifar_cpu", small_batch=True, norm_batch_size=2)
  assert small.peak_lr() == pytest.approx(small.lr * 2 / 32)
  assert S.PRESETS == ("seg_quick", "seg_cpu")
