"""Attribution drift across saved checkpoints, after the fact (``inseq-lightning drift``).

For runs that were not monitored live, or to compare checkpoints from different runs: each
checkpoint directory (``save_pretrained`` format, e.g. the HF Trainer's ``checkpoint-<N>``) is
loaded in turn, the probes are attributed, and the same monitor, drift metrics and sinks as
the training callbacks produce ``drift.csv``, HTML pages and attribution JSON (and, on request,
a TensorBoard run with the Attributions tab and its compare view), then one self-contained HTML
report of the whole comparison (:mod:`.viz.drift_report`).

PEFT adapter checkpoints (a LoRA run's ``checkpoint-<N>``: ``adapter_config.json`` and adapter
weights) share one base model: it is loaded once and each checkpoint's adapter is swapped in.
"""

import gc
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .attr.methods import get_method
from .errors import InvalidInputError, ModelLoadingError
from .models.loading import (
    AdapterSwitcher,
    adapter_base_model,
    import_peft,
    is_adapter_checkpoint,
    load_hf_model,
    load_tokenizer,
    tokenizer_dir,
)
from .monitor import ProbeMonitor
from .monitor.report import MonitorReport
from .sinks import FileSink, Sink, TensorBoardSink
from .viz.drift_report import write_drift_report

_STEP = re.compile(r"(?:checkpoint|step)[-_=]?(\d+)")


def checkpoint_step(path: Path, position: int) -> int:
    """The step in a name like ``checkpoint-500`` or ``step=500``; else the position in the list."""
    found = _STEP.search(path.name)
    return int(found.group(1)) if found else position


def drift_across_checkpoints(checkpoints: Sequence[str | Path], probes, output_dir: str | Path,
                             method: str = "saliency", step_scores: Sequence[str] = ("probability",),
                             tokenizer: str | Path | None = None, tensorboard: bool = False,
                             show_progress: bool = True, base_model: str | Path | None = None,
                             report: str | Path | None = None, **method_kwargs) -> list[MonitorReport]:
    """Attribute ``probes`` on each checkpoint, oldest step first; the first is the drift reference.

    ``checkpoints`` are all full models or all PEFT adapter checkpoints. Adapters are attributed
    switched on, on one base model: ``base_model`` (a local directory), else the
    ``base_model_name_or_path`` their ``adapter_config.json`` files agree on.

    Returns the reports; writes ``<output_dir>/drift.csv``, ``step_<N>/<probe>.{html,json}``, the
    report ``report`` (default ``<output_dir>/report.html``: curves, maps and difference maps in one
    self-contained file) and, with ``tensorboard=True``, a TensorBoard run in ``<output_dir>/tensorboard``.
    """
    if get_method(method).granularity == "none":  # dummy: the report would show empty maps, drift columns of '-'
        raise InvalidInputError(f"drift compares attribution maps across checkpoints, and method {method!r} computes "
                                "none (step scores only): use a method that computes maps (the default, saliency, or "
                                "another of list_feature_attribution_methods()); drift.csv and the report hold the "
                                "step scores with every method")
    paths = [Path(c) for c in checkpoints]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise ModelLoadingError(f"Not a checkpoint directory: {', '.join(missing)}")
    ordered = sorted(((checkpoint_step(p, i), p) for i, p in enumerate(paths)), key=lambda sp: sp[0])
    steps = [s for s, _ in ordered]
    if len(set(steps)) != len(steps):
        raise ModelLoadingError(f"Two checkpoints have the same step ({steps}); name them checkpoint-<step>")
    base_dir = _adapters_base(paths, base_model)
    output_dir = Path(output_dir)
    monitor = ProbeMonitor(probes, method, step_scores, method_kwargs, strict=False)
    sinks: list[Sink] = [FileSink(output_dir)]
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tensorboard"))
        sinks.append(TensorBoardSink(writer))
    reports = []
    columns = (TextColumn("[bold]drift[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("checkpoints", total=len(ordered))
        loaded = _full_models(ordered, tokenizer) if base_dir is None else _adapted_models(ordered, base_dir, tokenizer)
        for step, path, model, model_tokenizer in loaded:
            progress.update(task, description=path.name)
            reports.append(monitor.run(model, model_tokenizer, step, sinks=sinks))
            progress.advance(task)
    if writer is not None:
        writer.close()
    names = {step: str(path) for step, path in ordered}
    write_drift_report(output_dir / "report.html" if report is None else report, reports, names)
    return reports


def _adapters_base(paths: list[Path], base_model: str | Path | None) -> Path | None:
    """The base model directory when every checkpoint is an adapter; ``None`` when none is."""
    adapters = [is_adapter_checkpoint(p) for p in paths]
    if not any(adapters):
        if base_model is not None:
            raise ModelLoadingError("--base-model applies to PEFT adapter checkpoints (directories with "
                                    "adapter_config.json); these are full checkpoints: drop --base-model")
        return None
    if not all(adapters):
        full = ", ".join(str(p) for p, adapter in zip(paths, adapters, strict=True) if not adapter)
        raise ModelLoadingError(f"Mixed checkpoints: {full} hold full models, the others PEFT adapters. Run drift "
                                "on each kind separately, or merge the adapters (merge_and_unload) and save them")
    bases = {adapter_base_model(p, base_model).resolve() for p in paths}
    if len(bases) > 1:
        raise ModelLoadingError(f"The adapter checkpoints name different base models ({', '.join(map(str, sorted(bases)))}); "
                                "drift compares adapters on one base: pass --base-model to choose it")
    import_peft()  # before any weights are read
    return bases.pop()


def _full_models(ordered, tokenizer) -> Iterator[tuple[int, Path, PreTrainedModel, PreTrainedTokenizerBase]]:
    for step, path in ordered:
        model = load_hf_model(path)
        yield step, path, model, load_tokenizer(tokenizer or path)
        del model
        gc.collect()  # one checkpoint in memory at a time


def _adapted_models(ordered, base_dir: Path,
                    tokenizer) -> Iterator[tuple[int, Path, PreTrainedModel, PreTrainedTokenizerBase]]:
    switcher = AdapterSwitcher(base_dir)  # the base weights are read once for every checkpoint
    for step, path in ordered:
        yield step, path, switcher.load(path), load_tokenizer(tokenizer or tokenizer_dir(path, base_dir))
