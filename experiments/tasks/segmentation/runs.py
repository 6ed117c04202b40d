"""The segmentation sweep: which runs, their files, fine-tuning starts, one run, the report."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import mabn_jax as mj
from experiments.loop.config import Config
from experiments.tasks.segmentation import data as seg_data
from experiments.tasks.segmentation.report import (
  aggregate,
  table_markdown,
  write_examples,
  write_plot,
)
from experiments.tasks.segmentation.task import run_normalizer
from experiments.tasks.segmentation.training import load_variables, save_variables, train

DEFAULT_OUT_DIR = os.path.join("experiments", "results", "segmentation_cifar_cpu")
FINETUNE_METHODS = ("ft_mabn", "ft_bn")
"""The fine-tune runs ``--finetune`` adds by default."""
ALL_FINETUNE_METHODS = FINETUNE_METHODS + ("ft_frozen_bn",)
"""Every fine-tune method (``ft_frozen_bn``: BN's statistics and affine map held fixed)."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run: ``method`` is a registry name (from scratch) or a fine-tune method."""

  method: str
  batch_size: int
  seed: int

  @property
  def name(self) -> str:
    """``<method>_b<batch>_s<seed>``."""
    return f"{self.method}_b{self.batch_size}_s{self.seed}"

  @property
  def finetune(self) -> bool:
    """Whether the run fine-tunes the BN reference model."""
    return self.method in ALL_FINETUNE_METHODS


def plan_runs(
  norms: Sequence[str],
  batch_sizes: Sequence[int],
  seeds: Sequence[int],
  reference_batch: int,
  reference: bool = True,
  finetune: bool = False,
  pretrained: bool = False,
  finetune_methods: Sequence[str] = FINETUNE_METHODS,
) -> List[RunSpec]:
  """The runs, pretraining (BN at ``reference_batch``) first for every seed.

  ``norms`` at every batch size; BN at the reference batch when ``reference``,
  or with ``finetune`` unless the BN variables are given (``pretrained``):
  its final variables are the fine-tuning start; with ``finetune``,
  ``finetune_methods`` (of :data:`FINETUNE_METHODS`) at every batch size
  other than the reference.
  Duplicates are dropped.
  """
  runs: List[RunSpec] = []
  for seed in seeds:
    if reference or (finetune and not pretrained):
      runs.append(RunSpec("bn", reference_batch, seed))
    runs += [RunSpec(norm, b, seed) for b in batch_sizes for norm in norms]
    if finetune:
      runs += [
        RunSpec(m, b, seed) for b in batch_sizes if b != reference_batch for m in finetune_methods
      ]
  return list(dict.fromkeys(runs))


def run_path(out_dir: str, spec: RunSpec) -> str:
  """``<out_dir>/runs/<run>.json``."""
  return os.path.join(out_dir, "runs", f"{spec.name}.json")


def checkpoint_path(out_dir: str, spec: RunSpec) -> str:
  """``<out_dir>/checkpoints/<run>.msgpack``."""
  return os.path.join(out_dir, "checkpoints", f"{spec.name}.msgpack")


def read_summary(path: str) -> Optional[dict]:
  """A run's summary if it finished, else None."""
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if summary.get("finished") else None


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as JSON to ``path``, atomically."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def pretrained_variables(
  spec: RunSpec, out_dir: str, pretrained: Optional[str], reference_batch: int
) -> dict:
  """The BN variables a fine-tune run starts from.

  ``pretrained``: a ``.msgpack`` file (every seed) or a directory holding
  ``bn_b<reference_batch>_s<seed>.msgpack``; default the reference run's
  checkpoint under ``out_dir``.
  """
  source = RunSpec("bn", reference_batch, spec.seed)
  if pretrained and os.path.isfile(pretrained):
    path = pretrained
  elif pretrained:
    path = os.path.join(pretrained, f"{source.name}.msgpack")
  else:
    path = checkpoint_path(out_dir, source)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"fine-tune run {spec.name}: no BN checkpoint at {path!r} (run "
      f"{source.name} first, or pass --pretrained)"
    )
  return load_variables(path)


def finetune_start(
  spec: RunSpec, base: Config, bn_variables: dict, mabn_kwargs: Optional[Dict[str, Any]] = None
):
  """``(config, variables, normalizer)`` of a fine-tune run from BN variables.

  ``ft_mabn``: :func:`mabn_jax.convert_batch_norm` with the BN normalizer the
  checkpoint was trained with (``mabn_kwargs`` become the MABN options);
  ``ft_bn``: the BN variables and normalizer unchanged; ``ft_frozen_bn``:
  the BN variables converted to ``'frozen_bn'`` (statistics and affine map
  fixed, as detection backbones are fine-tuned).
  """
  config = dataclasses.replace(
    base, norm="bn", norm_kwargs={}, batch_size=spec.batch_size, seed=spec.seed
  )
  bn = run_normalizer(config)
  if spec.method == "ft_bn":
    return config, bn_variables, bn
  if spec.method == "ft_frozen_bn":
    variables, frozen = mj.convert_batch_norm(bn_variables, bn, name="frozen_bn")
    return dataclasses.replace(config, norm="frozen_bn"), variables, frozen
  variables, mabn = mj.convert_batch_norm(bn_variables, bn, **dict(mabn_kwargs or {}))
  return dataclasses.replace(config, norm="mabn", norm_kwargs=dict(mabn.kwargs)), variables, mabn


# Config fields a finished run may differ in and still be reused (paths, logging,
# and the normalizer, which the run's name fixes).
_NOT_COMPARED = (
  "norm",
  "norm_kwargs",
  "tarball",
  "cache_dir",
  "data_dir",
  "log_every",
  "num_examples",
  "eval_batch_size",
  "progress",
  "prefetch",
  "workdir",
)


def config_record(config: Config) -> dict:
  """``config`` as the JSON-compatible dict a summary stores."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check_same_run(summary: dict, config: Config) -> None:
  """Raises ``ValueError`` if a finished run was made with another configuration.

  Runs are found by name (``<method>_b<batch>_s<seed>``), so an ``out_dir``
  reused with other data or optimization settings would mix them silently.
  The fields the finished run recorded are compared (a field added to
  :class:`~experiments.loop.config.Config` since keeps its default there).
  """
  stored, wanted = summary.get("config", {}), config_record(config)
  differ = sorted(
    k for k in wanted if k in stored and k not in _NOT_COMPARED and stored[k] != wanted[k]
  )
  if differ:
    raise ValueError(
      f"run {summary.get('run')} in this out_dir finished with other settings "
      f"({', '.join(f'{k}: {stored.get(k)!r} != {wanted[k]!r}' for k in differ)}); "
      "use another --out_dir or remove its runs/ files"
    )


def write_run_files(
  spec: RunSpec, base: Config, dataset: seg_data.SegDataset, out_dir: str, final, preds, summary
) -> None:
  """The reference BN run's variables, the run's example predictions and its summary."""
  if spec.method == "bn" and spec.batch_size == base.reference_batch:
    save_variables(checkpoint_path(out_dir, spec), final)
  n = len(preds)
  write_examples(
    os.path.join(out_dir, "examples", f"{spec.name}.png"),
    dataset.test.images[:n],
    dataset.test.masks[:n],
    preds,
    dataset.class_names,
    f"{spec.name}: test mIoU {100 * summary['test_miou']:.1f}%",
  )
  write_json(run_path(out_dir, spec), summary)


def run_one(
  spec: RunSpec,
  base: Config,
  dataset: seg_data.SegDataset,
  out_dir: str,
  pretrained: Optional[str] = None,
  finetune_epochs: float = 1.0,
  finetune_lr: Optional[float] = None,
  mabn_kwargs: Optional[Dict[str, Any]] = None,
  norm_options: Optional[Dict[str, Dict[str, Any]]] = None,
  verbose: bool = False,
) -> dict:
  """Trains ``spec`` (or reads its finished summary) and writes its files.

  Fine-tune runs train ``finetune_epochs`` (``base.steps`` steps when set) at
  ``finetune_lr`` (default ``base.lr``; scaled to the batch like every run).
  From-scratch runs use ``norm_options[method]`` as their normalizer options.
  BN runs at the reference batch save their final variables (the
  fine-tuning start). A finished run is read back, after
  :func:`check_same_run`.
  """
  variables = normalizer = None
  norm_kwargs = dict((norm_options or {}).get(spec.method, {}))
  config = dataclasses.replace(
    base, norm=spec.method, norm_kwargs=norm_kwargs, batch_size=spec.batch_size, seed=spec.seed
  )
  length = dict(epochs=finetune_epochs, lr=base.lr if finetune_lr is None else finetune_lr)
  done = read_summary(run_path(out_dir, spec))
  if done is not None:
    check_same_run(done, dataclasses.replace(config, **length) if spec.finetune else config)
    return {**done, "skipped": True}
  if spec.finetune:
    bn_vars = pretrained_variables(spec, out_dir, pretrained, base.reference_batch)
    config, variables, normalizer = finetune_start(spec, base, bn_vars, mabn_kwargs)
    config = dataclasses.replace(config, **length)
  if verbose:
    config = dataclasses.replace(config, progress=True)
  summary, final, preds = train(config, dataset, variables, normalizer)
  summary = {"run": spec.name, "method": spec.method, **summary, "config": config_record(config)}
  write_run_files(spec, base, dataset, out_dir, final, preds, summary)
  return summary


def write_report(out_dir: str, summaries: Sequence[dict], title: str) -> List[dict]:
  """``table.md`` and ``plot.png`` of the given runs; returns the table rows."""
  rows = aggregate(summaries)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table_markdown(rows, title))
  write_plot(os.path.join(out_dir, "plot.png"), rows, summaries)
  return rows
