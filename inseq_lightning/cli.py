"""Command line: ``inseq-lightning attribute``, ``attribute-dataset`` and ``attribute-context`` take inseq 0.7.1's
flags and write the JSON, HTML and console views; ``drift`` follows a probe set across saved checkpoints."""

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import math
import sys
import textwrap
import traceback
from pathlib import Path

PROG = "inseq-lightning"
DEMO_PROMPT = "Question: where is the key? Context: the key is under the red box. Answer:"
DEMO_TARGET = DEMO_PROMPT + " the key is under the red box."
DEMO_MAX_NEW_TOKENS = 10

# inseq 0.7.1's aggregator names (list_aggregators() + list_aggregation_functions()): a name inseq takes that this
# library lacks is refused by name, not mistaken for a typo.
INSEQ_AGGREGATORS = ["split", "slices", "pair", "scores", "spans", "subwords",
                     "min", "vnorm", "mean", "max", "sum", "absmax", "prod"]
DATASET_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class CLIError(Exception):
    """A problem with the command as given: printed as one line, exit status 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; a default shown only where there is one."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if ("%(default)" not in help_text and action.option_strings
                and action.default not in (None, False, [], {}, argparse.SUPPRESS)):
            help_text += " (default: %(default)s)"
        return help_text


class _Parser(argparse.ArgumentParser):
    """Usage errors raise :class:`CLIError` (one line) instead of printing usage; the epilog (the method and step
    function lists, which import torch) is built only when help is asked for."""

    def __init__(self, *args, lazy_epilog=None, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self._lazy_epilog = lazy_epilog

    def format_help(self):
        if self._lazy_epilog is not None:
            self.epilog, self._lazy_epilog = self._lazy_epilog(), None
        return super().format_help()

    def error(self, message):
        raise CLIError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# ---- argument types ------------------------------------------------------------------------------------------------
def _str_to_bool(value: str | bool) -> bool:
    """inseq's boolean flags: ``--flag`` alone is True, ``--flag false`` (yes/no, true/false, t/f, y/n, 1/0) too."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a truth value (yes/no, true/false, t/f, y/n, 1/0), got {value!r}")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"n_steps\": 20}}', got {text!r}")
    return value


def _bool_flag(parser, *names, help):
    parser.add_argument(*names, type=_str_to_bool, nargs="?", const=True, default=False, metavar="BOOL", help=help)


# ---- help ----------------------------------------------------------------------------------------------------------
def _wrapped(label: str, names: list[str]) -> str:
    return textwrap.fill(f"{label}: {', '.join(names)}.", width=100, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def _supported_aggregators() -> list[str]:
    """Aggregator names this library's ``aggregate`` takes (``list_aggregators()`` when the package exports it)."""
    from .data import aggregation

    names = list(aggregation.list_aggregation_functions())
    lister = getattr(aggregation, "list_aggregators", None)
    if lister is None:
        lister = getattr(importlib.import_module("inseq_lightning"), "list_aggregators", None)
    aggregators = list(lister()) if lister is not None else ["spans", "subwords"]
    return [*aggregators, *[n for n in names if n not in aggregators]]


def _attribute_epilog(dataset: bool) -> str:
    from . import list_feature_attribution_methods, list_step_functions

    texts = "--generated_text_field" if dataset else "-g/--generated_texts/--target"
    parts = [
        _wrapped("Attribution methods (-a)", list_feature_attribution_methods()),
        _wrapped("Step functions (--step_scores, -fn)", list_step_functions()),
        _wrapped("Aggregators (--attribution_aggregators)", _supported_aggregators()),
        textwrap.fill(
            f"Decoder-only models: a generated text ({texts}) is the whole sequence and includes its prompt, as in "
            "inseq: the input 'The cat' is attributed with the generated text 'The cat sat on the mat'. "
            "Encoder-decoder models: the generated text is the target alone.", width=100),
        textwrap.fill(
            "Models load from local directories only (save_pretrained format, or a PEFT adapter checkpoint); "
            "nothing is downloaded. Errors print one line and exit with status 2; --debug shows the traceback.",
            width=100),
    ]
    if dataset:
        parts.append(textwrap.fill(
            "The dataset is a local .jsonl/.json/.csv/.parquet/.txt file, a local dataset directory, a `datasets` "
            "builder name with --dataset_files, or a dataset already in the local `datasets` cache (offline).",
            width=100))
    else:
        parts.append(textwrap.fill(
            "Without -m the tiny demo GPT-2 (random weights, built locally) attributes a demo question with the "
            "step score probability and writes outputs/attributions.{html,json}.", width=100))
    return "\n\n".join(parts)


# ---- parser --------------------------------------------------------------------------------------------------------
def _add_attribute_args(parser: argparse.ArgumentParser, texts: bool) -> None:
    """inseq 0.7.1's AttributeExtendedArgs, same names, aliases and defaults; this CLI's earlier short forms
    (``--model``, ``--method``, ``--step-scores``, ``--max-new-tokens``, ``--output-dir``) as extra aliases."""
    add = parser.add_argument
    add("--model_name_or_path", "-m", "--model", default=None,
        help="local model directory (save_pretrained format, or a PEFT adapter checkpoint); "
             "without it, the tiny demo GPT-2")
    add("--attribution_method", "-a", "--method", default="saliency",
        help="attribution method (listed below)")
    if texts:
        add("--input_texts", "-i", "--input", nargs="+", action="extend", default=None,
            help="one or more input texts (prompts or source texts)")
        add("--generated_texts", "-g", "--target", nargs="+", action="extend", default=None,
            help="one generated text per input, attributed instead of the model's own generation "
                 "(decoder-only: including the prompt)")
    add("--device", "--dev", default=None,
        help="device for the model (default: cuda when available, else cpu; multi-GPU is not supported)")
    add("--attributed_fn", "-fn", default=None,
        help="step function whose value is attributed (default: probability); its arguments "
             "(e.g. contrast_targets for contrast_prob_diff) go in --attribution_kwargs")
    add("--attribution_selectors", nargs="+", type=int, default=None,
        help="indices of the attribution scores each aggregator applies to (inseq's select_idx)")
    add("--attribution_aggregators", "--aggregators", nargs="+", default=None,
        help="aggregators applied before saving (--save_path), in order, to reach one score per token")
    _bool_flag(parser, "--normalize_attributions",
               help="with aggregators: normalize each step's scores to sum to 1")
    _bool_flag(parser, "--rescale_attributions",
               help="with aggregators: rescale the scores by their absolute maximum")
    add("--model_kwargs", type=_json_dict, default={}, help="from_pretrained arguments of the model, as JSON")
    add("--tokenizer_kwargs", type=_json_dict, default={}, help="from_pretrained arguments of the tokenizer, as JSON")
    add("--generation_kwargs", type=_json_dict, default={}, help="generate() arguments, as JSON")
    add("--attribution_kwargs", "--attribution_args", type=_json_dict, default={},
        help="arguments of the attribution method and of the step functions (e.g. n_steps, contrast_targets), "
             "as JSON")
    _bool_flag(parser, "--attribute_target",
               help="also attribute the generated target prefix at every step (encoder-decoder)")
    _bool_flag(parser, "--generate_from_target_prefix",
               help="use the generated texts as prefixes to generate from (encoder-decoder)")
    add("--step_scores", "--step-scores", nargs="*", default=None,
        help="step functions computed alongside (default: none; probability for the demo)")
    _bool_flag(parser, "--output_step_attributions", help="also keep per-step attributions in the output")
    _bool_flag(parser, "--include_eos_baseline", "--eos",
               help="include the EOS token in the baseline (methods with a baseline)")
    add("--batch_size", "-bs", type=int, default=8, help="sequences per forward")
    _bool_flag(parser, "--aggregate_output",
               help="aggregate the saved output (with --attribution_aggregators, else the default aggregator)")
    _bool_flag(parser, "--hide_attributions", "--hide", help="do not print the attributions to the console")
    add("--save_path", "-o", default=None, help="write the attribution output here as JSON")
    add("--viz_path", default=None, help="write the HTML heatmaps here")
    add("--output-dir", "--output_dir", dest="output_dir", default=None,
        help="write attributions.json and attributions.html in this directory")
    add("--start_pos", "-s", "--attr_pos_start", type=int, default=None,
        help="first target position attributed (attr_pos_start; default: the first generated token)")
    add("--end_pos", "-e", "--attr_pos_end", type=int, default=None,
        help="target position where attribution stops (attr_pos_end; default: the end)")
    add("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=None,
        help="tokens to generate when no generated text is given (generation_kwargs' max_new_tokens; "
             f"default: the model's generation config, {DEMO_MAX_NEW_TOKENS} for the demo)")
    _bool_flag(parser, "--verbose", "-v", help="log at INFO level")
    _bool_flag(parser, "--very_verbose", "-vv", help="log at DEBUG level")
    add("--debug", action="store_true", help="show the traceback of an error")


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """inseq 0.7.1's LoadDatasetArgs (its ``--input`` alias names the input field here)."""
    add = parser.add_argument
    add("--dataset_name", "-d", "--dataset", required=True,
        help="a local data file (.jsonl, .json, .csv, .parquet, .txt), a local dataset directory, a `datasets` "
             "builder name (json, csv, ...) with --dataset_files, or a dataset in the local `datasets` cache")
    add("--input_text_field", "-in", "--input", required=True, help="field holding the input texts")
    add("--generated_text_field", "-gen", "--generated", default=None,
        help="field holding the generated texts (constrained decoding)")
    add("--dataset_config", "--config", default=None, help="dataset configuration name")
    add("--dataset_dir", "--dir", default=None, help="directory holding the data files")
    add("--dataset_files", "--files", nargs="+", default=None, help="data files")
    add("--dataset_split", "--split", default="train", help="dataset split")
    add("--dataset_revision", "--revision", default=None, help="dataset revision (of a cached dataset)")
    add("--dataset_auth_token", "--auth", default=None, help="auth token (of a cached dataset)")
    add("--dataset_kwargs", type=_json_dict, default={}, help="load_dataset arguments, as JSON")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description=__doc__)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    attribute = sub.add_parser(
        "attribute", help="attribute one or more texts (inseq's flags) and write JSON, HTML and console views",
        description="Attribute one or more texts, with inseq 0.7.1's `inseq attribute` flags.",
        lazy_epilog=lambda: _attribute_epilog(dataset=False))
    _add_attribute_args(attribute, texts=True)
    attribute.set_defaults(func=attribute_command)

    dataset = sub.add_parser(
        "attribute-dataset", help="attribute every example of a dataset or local data file",
        description="Attribute every example of a dataset, with inseq 0.7.1's `inseq attribute-dataset` flags; "
                    "a progress bar counts the examples, attributed --batch_size at a time.",
        lazy_epilog=lambda: _attribute_epilog(dataset=True))
    _add_attribute_args(dataset, texts=False)
    _add_dataset_args(dataset)
    dataset.set_defaults(func=attribute_dataset_command)

    context = sub.add_parser(
        "attribute-context", help="context attribution (PECoRe): context-sensitive tokens and their contextual cues",
        description="Find the tokens of a generated output that depend on the context (CTI) and attribute them to "
                    "the context tokens (CCI), with inseq 0.7.1's `inseq attribute-context` flags.",
        lazy_epilog=_context_epilog)
    _add_context_args(context)
    context.set_defaults(func=attribute_context_command)

    drift = sub.add_parser("drift", help="attribution drift of a probe set across saved checkpoints")
    drift.add_argument("checkpoints", nargs="+",
                       help="checkpoint directories: full models (save_pretrained format) or PEFT adapter checkpoints")
    drift.add_argument("--probes", required=True, help="probes as .jsonl or .csv (prompt, target, evidence, name)")
    drift.add_argument("--method", default="saliency")
    drift.add_argument("--step-scores", nargs="*", default=["probability"])
    drift.add_argument("--tokenizer", help="tokenizer directory (default: each checkpoint's own, else the base model's)")
    drift.add_argument("--base-model", help="base model directory of adapter checkpoints, loaded once "
                       "(default: base_model_name_or_path in their adapter_config.json)")
    drift.add_argument("--output-dir", default="outputs/drift")
    drift.add_argument("--tensorboard", action="store_true", help="also write a TensorBoard run")
    drift.add_argument("--report", help="the HTML report: curves, each checkpoint's maps and their differences in "
                       "one self-contained file (default: <output-dir>/report.html)")
    drift.add_argument("--debug", action="store_true", help="show the traceback of an error")
    drift.set_defaults(func=drift_command)
    return parser


# ---- attribution ---------------------------------------------------------------------------------------------------
def _setup_logging(args) -> None:
    level = logging.DEBUG if args.very_verbose else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s.%(msecs)03d %(levelname)s %(module)s - %(funcName)s: "
                        "%(message)s", datefmt="%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def _quiet_libraries(args):
    """Without -v, no weight-loading bars (the command shows its own progress); transformers' setting is restored
    afterwards (``main`` also runs in-process)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not (args.verbose or args.very_verbose):
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _check_names(args, step_scores: list[str]) -> None:
    """Methods, step functions and aggregators are checked before a model is loaded."""
    from . import list_feature_attribution_methods, list_step_functions
    from .errors import UnknownMethodError, UnknownStepFunctionError

    methods, functions = list_feature_attribution_methods(), list_step_functions()
    if args.attribution_method not in methods:
        raise UnknownMethodError(args.attribution_method, methods)
    for name in [*step_scores, *([args.attributed_fn] if args.attributed_fn else [])]:
        if name not in functions:
            raise UnknownStepFunctionError(name, functions)
    supported = _supported_aggregators()
    for name in args.attribution_aggregators or []:
        if name in supported:
            continue
        if name in INSEQ_AGGREGATORS:
            raise CLIError(f"aggregator {name!r} is inseq's but inseq-lightning does not provide it yet; "
                           f"available: {', '.join(supported)}")
        raise CLIError(f"unknown aggregator {name!r}; choose from: {', '.join(supported)}")
    if args.normalize_attributions and args.rescale_attributions:
        raise CLIError("--normalize_attributions and --rescale_attributions exclude each other: pass one")
    if args.attribution_selectors is not None:
        from .data import FeatureAttributionSequenceOutput

        if "select_idx" not in inspect.signature(FeatureAttributionSequenceOutput.aggregate).parameters:
            raise CLIError("--attribution_selectors (inseq's select_idx) is not supported by inseq-lightning yet: "
                           "aggregate without it")
        if not args.attribution_aggregators:
            raise CLIError("--attribution_selectors needs --attribution_aggregators (one aggregator per selector)")


def _default_device() -> str | None:
    import torch

    return "cuda" if torch.cuda.is_available() else None  # inseq: cuda, else cpu (where models load)


def _load(args):
    from . import load_model

    device = args.device or _default_device()
    if args.model_name_or_path is None:
        if args.model_kwargs or args.tokenizer_kwargs:
            raise CLIError("--model_kwargs and --tokenizer_kwargs need a model directory: pass -m DIR")
        from .tiny_models import tiny_gpt2

        hf_model, tokenizer = tiny_gpt2()
        return load_model(hf_model, args.attribution_method, tokenizer=tokenizer, device=device)
    return load_model(args.model_name_or_path, args.attribution_method, device=device,
                      model_kwargs=args.model_kwargs or None, tokenizer_kwargs=args.tokenizer_kwargs or None)


def _generation_kwargs(args, model, demo: bool) -> dict:
    kwargs = dict(args.generation_kwargs)
    if args.max_new_tokens is not None:
        if kwargs.get("max_new_tokens", args.max_new_tokens) != args.max_new_tokens:
            raise CLIError("--max-new-tokens and --generation_kwargs' max_new_tokens differ: pass one")
        kwargs["max_new_tokens"] = args.max_new_tokens
    elif demo:
        kwargs.setdefault("max_new_tokens", DEMO_MAX_NEW_TOKENS)
    # inseq: a multilingual tokenizer's tgt_lang sets the forced BOS token of generation
    tgt_lang = args.tokenizer_kwargs.get("tgt_lang")
    lang_ids = getattr(model.tokenizer, "lang_code_to_id", None)
    if tgt_lang is not None and "forced_bos_token_id" not in kwargs and lang_ids is not None:
        kwargs["forced_bos_token_id"] = lang_ids[tgt_lang]
    return kwargs


def _attribute_kwargs(args, model, step_scores, generation_kwargs) -> dict:
    kwargs = dict(args.attribution_kwargs)
    if args.generate_from_target_prefix:
        if "generate_from_target_prefix" not in inspect.signature(model.attribute).parameters:
            raise CLIError("--generate_from_target_prefix is not supported by inseq-lightning yet")
        kwargs["generate_from_target_prefix"] = True
    return dict(batch_size=args.batch_size, attribute_target=args.attribute_target,
                attributed_fn=args.attributed_fn, step_scores=step_scores,
                output_step_attributions=args.output_step_attributions,
                include_eos_baseline=args.include_eos_baseline, generation_args=generation_kwargs,
                attr_pos_start=args.start_pos, attr_pos_end=args.end_pos, **kwargs)


def _aggregate_for_saving(args, out):
    """inseq's ``aggregate_attribution_scores``: one ``aggregate`` per (selector, aggregator) pair, else one call
    with the aggregator list (or the default one for ``--aggregate_output``)."""
    aggregators = args.attribution_aggregators
    if args.attribution_selectors is not None:
        for select_idx, aggregator in zip(args.attribution_selectors, aggregators, strict=False):
            out = out.aggregate(aggregator=aggregator, normalize=args.normalize_attributions,
                                rescale=args.rescale_attributions, select_idx=select_idx)
        return out
    return out.aggregate(aggregator=aggregators, normalize=args.normalize_attributions,
                         rescale=args.rescale_attributions)


def _write_outputs(args, out, console) -> None:
    from .viz import attributions_html, print_attributions

    shown = [s.aggregate() for s in out]
    if not args.hide_attributions:
        print_attributions(shown, console=console)
    title = f"{args.attribution_method} attributions"
    html_paths = [Path(args.viz_path)] if args.viz_path else []
    json_paths = [Path(args.save_path)] if args.save_path else []
    if args.output_dir:
        html_paths.append(Path(args.output_dir) / "attributions.html")
        json_paths.append(Path(args.output_dir) / "attributions.json")
    if html_paths:
        page = attributions_html(shown, title=title)
        for path in html_paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(page, encoding="utf-8")
            console.print(f"HTML heatmap: [bold]{path}[/bold]")
    saved = _aggregate_for_saving(args, out) if (args.attribution_aggregators or args.aggregate_output) else out
    for path in json_paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        saved.save(path, overwrite=True)
        console.print(f"{'Aggregated attributions' if saved is not out else 'Attributions'} (JSON): "
                      f"[bold]{path}[/bold]")


def _run(args, input_texts, generated_texts, demo: bool, dataset: bool) -> int:
    from .viz.console import default_console

    console = default_console()
    if generated_texts is not None and len(generated_texts) != len(input_texts):
        raise CLIError(f"give one generated text per input text: got {len(input_texts)} input(s) and "
                       f"{len(generated_texts)} generated text(s)")
    step_scores = args.step_scores if args.step_scores is not None else (["probability"] if demo else [])
    _check_names(args, step_scores)
    _setup_logging(args)
    with _quiet_libraries(args):
        model = _load(args)
        kwargs = _attribute_kwargs(args, model, step_scores, _generation_kwargs(args, model, demo))
        if dataset:
            out = _attribute_in_batches(model, input_texts, generated_texts, args.batch_size, kwargs, console)
        else:
            out = model.attribute(input_texts, generated_texts, show_progress=True, **kwargs)
    _write_outputs(args, out, console)
    return 0


def _attribute_in_batches(model, input_texts, generated_texts, batch_size, kwargs, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import merge_attributions

    batch_size = max(1, batch_size)
    outputs = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("Attributing examples", total=len(input_texts))
        for start in range(0, len(input_texts), batch_size):
            inputs = input_texts[start : start + batch_size]
            targets = generated_texts[start : start + batch_size] if generated_texts is not None else None
            outputs.append(model.attribute(inputs, targets, show_progress=False, **kwargs))
            progress.advance(task, len(inputs))
    return merge_attributions(outputs)


def attribute_command(args: argparse.Namespace) -> int:
    demo = args.model_name_or_path is None
    inputs, targets = args.input_texts, args.generated_texts
    if inputs is None:
        if not demo:
            raise CLIError("give the texts to attribute with -i/--input_texts")
        inputs, targets = [DEMO_PROMPT], (targets or [DEMO_TARGET])
        if args.output_dir is None and args.save_path is None and args.viz_path is None:
            args.output_dir = "outputs"
    return _run(args, inputs, targets, demo=demo, dataset=False)


# ---- datasets ------------------------------------------------------------------------------------------------------
def _load_dataset(args):
    """A local file, a local directory, a builder with local files, or a dataset already cached: never downloaded."""
    name, files = args.dataset_name, args.dataset_files
    path = Path(name)
    builder = DATASET_FILE_BUILDERS.get(path.suffix.lower())
    if builder is not None and not path.is_file():
        raise CLIError(f"dataset file {name!r} does not exist")
    try:
        import datasets
    except ImportError:
        raise CLIError("attribute-dataset reads data with `datasets`: pip install 'inseq-lightning[data]'") from None
    import huggingface_hub.constants as hub_constants

    options = dict(data_dir=args.dataset_dir, split=args.dataset_split, revision=args.dataset_revision,
                   token=args.dataset_auth_token, **args.dataset_kwargs)
    offline = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
               (hub_constants, "HF_HUB_OFFLINE")]
    saved = [getattr(module, attr) for module, attr in offline]
    for module, attr in offline:
        setattr(module, attr, True)
    quiet = not (args.verbose or args.very_verbose)
    bars = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        if builder is not None:
            return datasets.load_dataset(builder, args.dataset_config, data_files=[str(path), *(files or [])],
                                         **options)
        try:
            return datasets.load_dataset(name, args.dataset_config, data_files=files, **options)
        except Exception as error:  # datasets' own types differ by version and by what is missing
            raise CLIError(f"dataset {name!r} is not a local file or directory, nor in the local `datasets` cache "
                           f"(inseq-lightning never downloads): {' '.join(str(error).split())}") from error
    finally:
        for (module, attr), value in zip(offline, saved, strict=True):
            setattr(module, attr, value)
        if quiet and bars:
            datasets.enable_progress_bars()


def _dataset_texts(args) -> tuple[list[str], list[str] | None]:
    data = _load_dataset(args)
    if isinstance(data, dict):  # a DatasetDict: no split was selected
        raise CLIError(f"choose a split with --dataset_split: {', '.join(data)}")
    columns = list(data.column_names)
    if args.input_text_field not in columns:
        raise CLIError(f"the dataset has no field {args.input_text_field!r} (--input_text_field); "
                       f"its fields: {', '.join(columns)}")
    inputs = list(data[args.input_text_field])
    generated = None
    if args.generated_text_field is not None:
        if args.generated_text_field not in columns:  # inseq ignores a missing field silently
            raise CLIError(f"the dataset has no field {args.generated_text_field!r} (--generated_text_field); "
                           f"its fields: {', '.join(columns)}")
        generated = list(data[args.generated_text_field])
    if not inputs:
        raise CLIError(f"the dataset {args.dataset_name!r} ({args.dataset_split} split) has no examples")
    return inputs, generated


def attribute_dataset_command(args: argparse.Namespace) -> int:
    inputs, generated = _dataset_texts(args)
    return _run(args, inputs, generated, demo=args.model_name_or_path is None, dataset=True)


# ---- context attribution -------------------------------------------------------------------------------------------
def _add_context_args(parser: argparse.ArgumentParser) -> None:
    """inseq 0.7.1's AttributeContextArgs, one flag per field with its aliases and default (booleans as inseq's:
    ``--flag [BOOL]``, and ``--no_flag`` for those that default to true)."""
    import dataclasses
    import types
    import typing

    from .context.args import AttributeContextArgs

    hints = typing.get_type_hints(AttributeContextArgs)
    for f in dataclasses.fields(AttributeContextArgs):
        names, help_text = [f"--{f.name}", *f.metadata["aliases"]], f.metadata["help"]
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if kind is bool:
            _bool_flag(parser, *names, help=help_text)
            parser.set_defaults(**{f.name: default})
            if default is True:
                parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=f"do not {help_text}")
        elif kind is dict:
            parser.add_argument(*names, type=_json_dict, default=default, help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(*names, type=typing.get_args(kind)[0], nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(*names, type=kind, default=default, help=help_text)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _context_epilog() -> str:
    from . import list_feature_attribution_methods, list_step_functions
    from .context import contrastive_step_functions

    return "\n\n".join([
        _wrapped("Context sensitivity metrics (--context_sensitivity_metric)", contrastive_step_functions()),
        _wrapped("Attribution methods (-a)", list_feature_attribution_methods()),
        _wrapped("Attributed functions (-fn)", list_step_functions()),
        textwrap.fill(
            "Without --output_current_text the model generates the output (--generation_kwargs, e.g. "
            "'{\"max_new_tokens\": 10}'). Decoder-only models: the output follows the input after "
            "--decoder_input_output_separator. Models load from local directories only; without -m the tiny demo "
            "GPT-2 (random weights) is used. Errors print one line and exit with status 2; --debug shows the "
            "traceback.", width=100),
    ])


def attribute_context_command(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.markup import escape

    from .context import AttributeContextArgs, attribute_context_with_model
    from .context.attribution import check_names
    from .viz.console import default_console

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AttributeContextArgs)}
    context_args = AttributeContextArgs(**values)
    check_names(context_args)
    supported = _supported_aggregators()
    for name in context_args.attribution_aggregators or []:
        if name not in supported:
            raise CLIError(f"unknown aggregator {name!r}; choose from: {', '.join(supported)}")
    for path in (args.save_path, args.viz_path):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _quiet_libraries(argparse.Namespace(verbose=False, very_verbose=False)):
        model = _load(args)
        out = attribute_context_with_model(context_args, model)
    console = default_console()
    sensitive = ", ".join(repr(cci.cti_token) for cci in out.cci_scores) or "none"
    console.print(f"Context-sensitive tokens: {escape(sensitive)}", highlight=False)
    if args.save_path:
        console.print(f"Context attribution (JSON): [bold]{args.save_path}[/bold]")
    if args.viz_path:
        console.print(f"Context attribution (HTML): [bold]{args.viz_path}[/bold]")
    return 0


# ---- drift ---------------------------------------------------------------------------------------------------------
def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def drift_command(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .drift_checkpoints import drift_across_checkpoints
    from .viz.console import default_console

    console = default_console()
    reports = drift_across_checkpoints(args.checkpoints, args.probes, args.output_dir, method=args.method,
                                       step_scores=args.step_scores, tokenizer=args.tokenizer,
                                       tensorboard=args.tensorboard, base_model=args.base_model,
                                       report=args.report)
    table = Table(title=f"Attribution drift across checkpoints ({args.method}, mean over probes)")
    # The report's own means, under the names every tracker uses (monitor/values.py).
    names = [*[f"step_score/{s}" for s in args.step_scores], "evidence_mass", "drift_ref/cosine",
             "drift_ref/js_divergence", "drift_ref/spearman", "drift_ref/tokens_compared"]
    table.add_column("step", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for report in reports:
        means = report.means()
        table.add_row(str(report.step), *[_cell(means.get(name, math.nan)) for name in names])
    console.print(table)
    console.print(f"Per probe: [bold]{Path(args.output_dir) / 'drift.csv'}[/bold]; pages and JSON under step_<N>/")
    console.print(f"Report: [bold]{args.report or Path(args.output_dir) / 'report.html'}[/bold]")
    if args.tensorboard:
        console.print(f"TensorBoard: tensorboard --logdir {Path(args.output_dir) / 'tensorboard'}")
    return 0


# ---- entry point ---------------------------------------------------------------------------------------------------
def _one_line(error: BaseException) -> str:
    from .errors import InseqLightningError

    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, CLIError):
        return message if message.startswith(PROG) else f"{PROG}: error: {message}"
    if isinstance(error, InseqLightningError):
        return f"{PROG}: error: {message}"
    return f"{PROG}: error: {type(error).__name__}: {message} (--debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error prints one line to stderr and returns 2 (``--debug``: the traceback first)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "accepts_unknown", False):
            raise CLIError(f"{PROG} {args.command}: unrecognized arguments: {' '.join(unknown)} "
                           f"(see `{PROG} {args.command} --help`)")
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place where any error becomes one line
        if debug:
            traceback.print_exc()
        print(_one_line(error), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
