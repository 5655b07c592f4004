"""The views of a context attribution: inseq 0.7.1's console text (rich) and its HTML export.

The procedure (metric, method, texts), then one block per context-sensitive token: the output with that token
highlighted with its CTI score, and the context tokens whose CCI score passes ``attribution_std_threshold`` /
``attribution_topk``, highlighted with their scores.
"""

import copy
import io

from rich.console import Console
from rich.markup import escape

from ..errors import InvalidInputError
from .args import AttributeContextArgs
from .output import AttributeContextOutput
from .texts import filtered_tokens, rank_tokens, scores_threshold


def visualize_attribute_context(output: AttributeContextOutput, model=None, cti_threshold: float | None = None,
                                show_viz: bool = True, viz_path: str | None = None,
                                return_html: bool = False) -> str | None:
    """Print the view of ``output`` (``show_viz``), write it as HTML (``viz_path``), return the HTML (``return_html``).

    Args:
        output: a context attribution output with its ``info`` (``add_output_info=True``).
        model: the :class:`~inseq_lightning.models.AttributionModel` whose tokenizer splits the texts; default:
            loaded from ``output.info.model_name_or_path`` (a local directory).
        cti_threshold: the CTI threshold shown (default: computed from the scores as the selection did).
    """
    if output.info is None:
        raise InvalidInputError("this output has no info (add_output_info=False): the view needs the arguments")
    info = output.info
    if model is None or isinstance(model, str):
        from ..models import load_model

        model = load_model(model or info.model_name_or_path, info.attribution_method,
                           model_kwargs=copy.deepcopy(info.model_kwargs) or None,
                           tokenizer_kwargs=copy.deepcopy(info.tokenizer_kwargs) or None)
    if cti_threshold is None and output.cti_scores and len(output.cti_scores) > 1:
        cti_threshold = scores_threshold(output.cti_scores, info.context_sensitivity_std_threshold)
    text = _procedure(info) + "\n\n" + _results(model, info, output, cti_threshold)
    console = _recording_console(show_viz)
    console.print(text, soft_wrap=False)
    html = console.export_html()
    if viz_path:
        with open(viz_path, "w", encoding="utf-8") as f:
            f.write(html)
    return html if return_html else None


def _recording_console(show: bool) -> Console:
    """A console that records what it prints (for the HTML), to stdout or to nowhere. Off a terminal rich
    assumes 80 columns; a wider page keeps token rows readable in logs and files."""
    file = None if show else io.StringIO()
    width = None if show and Console().is_terminal else 200
    return Console(record=True, file=file, width=width)


def _selection(std: float | None, topk: int | None) -> str:
    parts = ([f"std λ={std:.2f}"] if std else []) + ([f"top {topk}"] if topk else [])
    return ", ".join(parts) or "all"


def _procedure(info: AttributeContextArgs) -> str:
    input_context = f"\n[bold]Input context:[/bold]\t{escape(info.input_context_text)}" if info.has_input_context else ""
    output_context = (f"\n[bold]Output context:[/bold]\t{escape(info.output_context_text)}"
                      if info.has_output_context else "")
    return (
        f"\nContext with [bold green]contextual cues[/bold green] "
        f"({_selection(info.attribution_std_threshold, info.attribution_topk)}) followed by output sentence with "
        f"[bold dodger_blue1]context-sensitive target spans[/bold dodger_blue1] "
        f"({_selection(info.context_sensitivity_std_threshold, info.context_sensitivity_topk)})\n"
        f'(CTI = "{info.context_sensitivity_metric}", CCI = "{info.attribution_method}" w/ "{info.attributed_fn}" '
        f"target)\n{input_context}\n[bold]Input current:[/bold] {escape(info.input_current_text)}"
        f"{output_context}\n[bold]Output current:[/bold]\t{escape(info.output_current_text)}"
    )


def _context_line(model, info: AttributeContextArgs, context: str, scores: list[float], other: list[float] | None,
                  is_target: bool, label: str) -> str:
    """One context's tokens, its cues highlighted (the threshold is computed over both contexts' scores)."""
    tokens = [escape(t) for t in filtered_tokens(model, context, info.special_tokens_to_keep,
                                                 replace_special_characters=True, is_target=is_target)]
    ranked, threshold = rank_tokens(tokens, [*scores, *(other or [])], info.attribution_std_threshold,
                                    info.attribution_topk)
    for idx, score, token in ranked:
        tokens[idx] = f"[bold green]{token}({score:.3f})[/bold green]"
    return f"\n[bold]{label} context (CCI > {threshold:.3f}):[/bold]\t{''.join(tokens)}"


def _results(model, info: AttributeContextArgs, output: AttributeContextOutput, cti_threshold: float | None) -> str:
    current_tokens = [escape(t) for t in filtered_tokens(model, output.output_current, info.special_tokens_to_keep,
                                                         replace_special_characters=True, is_target=True)]
    threshold_comment = f"(CTI > {cti_threshold:.3f})" if cti_threshold is not None else ""
    blocks = []
    for number, cci in enumerate(output.cci_scores, start=1):
        tokens = current_tokens.copy()
        if cci.cti_idx < len(tokens):
            tokens[cci.cti_idx] = (f"[bold dodger_blue1]{tokens[cci.cti_idx]}({cci.cti_score:.3f})"
                                   "[/bold dodger_blue1]")
        lines = f"#{number}.\n[bold]Generated output {threshold_comment}:[/bold]\t{''.join(tokens)}"
        if info.has_input_context:
            lines += _context_line(model, info, output.input_context, cci.input_context_scores,
                                   cci.output_context_scores if info.has_output_context else None, False, "Input")
        if info.has_output_context:
            lines += _context_line(model, info, output.output_context, cci.output_context_scores,
                                   cci.input_context_scores if info.has_input_context else None, True, "Output")
        blocks.append(lines + "\n")
    return "".join(blocks)
