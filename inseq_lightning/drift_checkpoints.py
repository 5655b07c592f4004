"""Attribution drift across saved checkpoints, after the fact (``inseq-lightning drift``).

For runs that were not monitored live, or to compare checkpoints from different runs: each
checkpoint directory (``save_pretrained`` format, e.g. the HF Trainer's ``checkpoint-<N>``) is
loaded in turn, the probes are attributed, and the same monitor, drift metrics and sinks as
the training callbacks produce ``drift.csv``, HTML pages and attribution JSON (and, on request,
a TensorBoard run with the Attributions tab).
"""

import gc
import re
from collections.abc import Sequence
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import ModelLoadingError
from .models.loading import load_model
from .monitor import ProbeMonitor
from .monitor.report import MonitorReport
from .sinks import FileSink, Sink, TensorBoardSink

_STEP = re.compile(r"(?:checkpoint|step)[-_=]?(\d+)")


def checkpoint_step(path: Path, position: int) -> int:
    """The step in a name like ``checkpoint-500`` or ``step=500``; else the position in the list."""
    found = _STEP.search(path.name)
    return int(found.group(1)) if found else position


def drift_across_checkpoints(checkpoints: Sequence[str | Path], probes, output_dir: str | Path,
                             method: str = "saliency", step_scores: Sequence[str] = ("probability",),
                             tokenizer: str | Path | None = None, tensorboard: bool = False,
                             show_progress: bool = True, **method_kwargs) -> list[MonitorReport]:
    """Attribute ``probes`` on each checkpoint, oldest step first; the first is the drift reference.

    Returns the reports; writes ``<output_dir>/drift.csv``, ``step_<N>/<probe>.{html,json}`` and,
    with ``tensorboard=True``, a TensorBoard run in ``<output_dir>/tensorboard``.
    """
    paths = [Path(c) for c in checkpoints]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise ModelLoadingError(f"Not a checkpoint directory: {', '.join(missing)}")
    ordered = sorted(((checkpoint_step(p, i), p) for i, p in enumerate(paths)), key=lambda sp: sp[0])
    steps = [s for s, _ in ordered]
    if len(set(steps)) != len(steps):
        raise ModelLoadingError(f"Two checkpoints have the same step ({steps}); name them checkpoint-<step>")
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
        for step, path in ordered:
            progress.update(task, description=path.name)
            wrapped = load_model(path, method, tokenizer=tokenizer)
            reports.append(monitor.run(wrapped.model, wrapped.tokenizer, step, sinks=sinks))
            del wrapped
            gc.collect()  # one checkpoint in memory at a time
            progress.advance(task)
    if writer is not None:
        writer.close()
    return reports
