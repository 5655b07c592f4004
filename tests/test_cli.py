"""``inseq-lightning`` as a user runs it: real subprocesses with inseq 0.7.1's flags (and this CLI's earlier short
forms) on a tiny GPT-2 and a tiny Marian saved to disk; the files they write are read back.

The commands start together (two cores, ~3 s of imports each) and each test checks one of them."""

import html
import json
import os
import re
import subprocess
import sys

import pytest

import inseq_lightning as il
from inseq_lightning.cli import main
from inseq_lightning.tiny_models import tiny_gpt2, tiny_marian

GPT2_INPUTS = ["the cat sat", "hello world"]
GPT2_TARGETS = ["the cat sat on the mat", "hello world, this is a cat"]
CONTEXT = "The cat sat on the mat and looked at the dog."
ROWS = [{"prompt": "the cat", "full": "the cat sat on"}, {"prompt": "on the mat", "full": "on the mat it is"},
        {"prompt": "hello", "full": "hello world"}]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Save the models, start every command at once, wait for all: ``(paths, {name: CompletedProcess})``."""
    root = tmp_path_factory.mktemp("cli")
    paths = {"root": root}
    for name, build in (("gpt2", tiny_gpt2), ("marian", tiny_marian)):
        model, tokenizer = build()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    gpt2, marian = paths["gpt2"], paths["marian"]
    commands = {
        # inseq 0.7.1's own flags, as `inseq attribute` takes them
        "gpt2": ["attribute", "-m", gpt2, "-a", "integrated_gradients", "-i", *GPT2_INPUTS, "-g", *GPT2_TARGETS,
                 "--step_scores", "probability", "entropy", "-fn", "probability", "--attribution_kwargs",
                 '{"n_steps": 3}', "-bs", "1", "--dev", "cpu", "-o", str(root / "gpt2.json"),
                 "--viz_path", str(root / "gpt2.html"), "--hide"],
        # this CLI's earlier short forms; no target: the model generates
        "marian": ["attribute", "--model", marian, "--method", "saliency", "--input", "the cat sat", "--input",
                   "hello", "--step-scores", "probability", "--max-new-tokens", "3", "--eos", "--attribute_target",
                   "--attribution_aggregators", "vnorm", "--normalize_attributions", "--output-dir",
                   str(root / "marian_out")],
        "dataset": ["attribute-dataset", "-m", gpt2, "-d", str(data), "-in", "prompt", "-gen", "full", "-bs", "2",
                    "--step_scores", "probability", "-o", str(root / "dataset.json"), "--hide"],
        "help": ["--help"],
        "help_attribute": ["attribute", "--help"],
        "version": ["--version"],
        "invalid_input": ["attribute", "-m", gpt2, "-i", "abc", "-g", "xyz"],
        "invalid_input_debug": ["attribute", "-m", gpt2, "-i", "abc", "-g", "xyz", "--debug"],
        # inseq's `inseq attribute-context` flags; the output is generated (greedy, no token twice: the random
        # model otherwise repeats a space)
        "context": ["attribute-context", "-m", gpt2, "--input_context_text", CONTEXT, "--input_current_text",
                    "Hello world,", "--generation_kwargs",
                    '{"max_new_tokens": 6, "do_sample": false, "no_repeat_ngram_size": 1}',
                    "-o", str(root / "context" / "context.json"), "--viz_path", str(root / "context.html")],
        "context_marian": ["attribute-context", "-m", marian, "--input_current_text", "Le chat est noir.",
                           "--output_context_text", "Das ist", "--output_current_text", "ein kleines Haus.",
                           "-fn", "contrast_prob_diff", "--context_sensitivity_std_threshold", "0",
                           "--context_sensitivity_topk", "1", "--no_show_viz",
                           "-o", str(root / "context_marian.json")],
        "context_unused": ["attribute-context", "-m", gpt2, "--input_current_text", "Hello", "--input_context_text",
                           "The cat.", "--input_template", "{current}"],
    }
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "hf_datasets"), "COLUMNS": "200"}
    started = {name: subprocess.Popen([sys.executable, "-m", "inseq_lightning.cli", *args], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=240)
        results[name] = subprocess.CompletedProcess(commands[name], process.returncode, out, err)
    return paths, results


def _ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_attribute_with_inseqs_flags_writes_json_and_html(cli):
    paths, results = cli
    _ok(results["gpt2"])
    out = il.FeatureAttributionOutput.load(paths["root"] / "gpt2.json")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["gpt2"])
    assert len(out) == 2 and out.info["attribution_method"] == "integrated_gradients"
    for seq, prompt, target in zip(out, GPT2_INPUTS, GPT2_TARGETS, strict=True):
        # decoder-only: the generated text includes its prompt; the prompt's tokens are the context
        assert [t.token for t in seq.target] == tokenizer.tokenize(target)
        assert seq.attr_pos_start == len(tokenizer.tokenize(prompt)) and seq.attr_pos_end == len(seq.target)
        steps = seq.attr_pos_end - seq.attr_pos_start
        assert set(seq.step_scores) == {"probability", "entropy"}
        assert all(v.shape == (steps,) for v in seq.step_scores.values())
        assert seq.target_attributions.shape[:2] == (len(seq.target), steps)
    page = html.unescape((paths["root"] / "gpt2.html").read_text(encoding="utf-8"))
    assert page.startswith("<!DOCTYPE html>")
    for seq in out:  # every token is a heatmap label (byte-level Ġ shown as a space)
        assert all(f">{t.token.replace('Ġ', ' ')}</th>" in page for t in seq.target)
    assert "integrated_gradients attributions" in page
    assert "Attributions (JSON)" in results["gpt2"].stdout and "Sequence 0" not in results["gpt2"].stdout  # --hide


def test_attribute_with_the_short_forms_generates_aggregates_and_writes_the_output_dir(cli):
    paths, results = cli
    _ok(results["marian"])
    assert "Sequence 1" in results["marian"].stdout  # the console view
    out_dir = paths["root"] / "marian_out"
    page = (out_dir / "attributions.html").read_text(encoding="utf-8")
    out = il.FeatureAttributionOutput.load(out_dir / "attributions.json")
    assert len(out) == 2 and "Sequence 1" in page
    assert out.info["input_texts"] == ["the cat sat", "hello"]
    for seq in out:
        steps = seq.attr_pos_end - seq.attr_pos_start
        assert 1 <= steps <= 3 and seq.step_scores["probability"].shape == (steps,)  # --max-new-tokens 3
        assert seq.source[-1].token == "</s>"
        # --attribution_aggregators vnorm --normalize_attributions: one score per token, columns summing to 1
        assert seq.source_attributions.ndim == 2 and seq.target_attributions.ndim == 2  # --attribute_target
        column = seq.source_attributions.sum(0) + seq.target_attributions.nan_to_num().sum(0)
        assert column.sub(1).abs().max() < 1e-5


def test_attribute_dataset_writes_one_output_per_example(cli):
    paths, results = cli
    _ok(results["dataset"])
    assert "Attributing examples" in results["dataset"].stdout and "3/3" in results["dataset"].stdout
    out = il.FeatureAttributionOutput.load(paths["root"] / "dataset.json")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["gpt2"])
    assert len(out) == len(ROWS)
    for seq, row in zip(out, ROWS, strict=True):
        assert [t.token for t in seq.target] == tokenizer.tokenize(row["full"])
        assert seq.step_scores["probability"].shape == (seq.attr_pos_end - seq.attr_pos_start,)


def test_help_lists_methods_step_functions_and_the_prompt_rule(cli, capsys):
    _, results = cli
    with pytest.raises(SystemExit) as exit_info:  # the same help in-process (one subprocess less)
        main(["attribute-dataset", "--help"])
    assert exit_info.value.code == 0
    results["help_dataset"] = subprocess.CompletedProcess([], 0, capsys.readouterr().out, "")
    for name in ("help_attribute", "help_dataset"):
        _ok(results[name])
        text = " ".join(results[name].stdout.split())
        for method in il.list_feature_attribution_methods():
            assert method in text, (name, method)
        for function in il.list_step_functions():
            assert function in text, (name, function)
        assert "includes its prompt" in text
        for flag in ("--model_name_or_path", "-m", "--attribution_method", "-a", "--step_scores", "--save_path",
                     "--viz_path", "--attributed_fn", "--attribution_kwargs", "--start_pos", "--batch_size"):
            assert flag in text
    assert "--dataset_name" in results["help_dataset"].stdout and "--input_text_field" in results["help_dataset"].stdout
    _ok(results["help"])
    for command in ("attribute", "attribute-dataset", "attribute-context", "drift"):
        assert command in results["help"].stdout
    with pytest.raises(SystemExit):
        main(["attribute-context", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--input_context_text", "--input_current_text", "--output_context_text", "--output_current_text",
                 "--context_sensitivity_metric", "--no_show_viz", "-fn", "-o", "--viz_path", "kl_divergence"):
        assert flag in text
    _ok(results["version"])
    assert results["version"].stdout.strip() == f"inseq-lightning {il.__version__}"


def test_errors_are_one_line_and_exit_2_and_debug_shows_the_traceback(cli):
    _, results = cli
    line = _one_error_line(results["invalid_input"])  # an InvalidInputError from attribution
    assert line.startswith("inseq-lightning: error:") and "does not start with its prompt" in line
    debug = results["invalid_input_debug"]
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "InvalidInputError" in debug.stderr
    line = _one_error_line(results["context_unused"])  # inseq warns and drops the context
    assert line == ("inseq-lightning: error: input_context_text is given but input_template '{current}' has no "
                    "{context} placeholder: add {context} to the template or drop the context")


def test_attribute_context_with_inseqs_flags_writes_json_and_html(cli):
    from inseq_lightning.context import AttributeContextOutput

    paths, results = cli
    _ok(results["context"])
    out = AttributeContextOutput.from_dict(json.loads((paths["root"] / "context" / "context.json").read_text()))
    assert out.input_context == CONTEXT and out.info.input_current_text == "Hello world,"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["gpt2"])
    # the generated output's tokens after the input and the separator, one CTI score each
    assert tokenizer.convert_tokens_to_string(out.output_current_tokens) == " " + out.output_current
    assert len(out.cti_scores) == len(out.output_current_tokens)
    assert len(out.cci_scores) >= 1
    for cci in out.cci_scores:  # one cue score per context token
        assert len(cci.input_context_scores) == len(out.input_context_tokens) and cci.output_context_scores is None
        assert cci.cti_token == out.output_current_tokens[cci.cti_idx]
    page = (paths["root"] / "context.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    page_text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", page)).split())  # without rich's spans
    stdout = " ".join(results["context"].stdout.split())
    for text in (page_text, stdout):  # the console view, printed and exported
        assert f"Input context: {CONTEXT}" in text and 'CTI = "kl_divergence", CCI = "saliency"' in text
    assert "Context attribution (JSON)" in stdout and "Context attribution (HTML)" in stdout


def test_attribute_context_on_an_encoder_decoder_with_output_context(cli):
    from inseq_lightning.context import AttributeContextOutput

    paths, results = cli
    _ok(results["context_marian"])
    out = AttributeContextOutput.from_dict(json.loads((paths["root"] / "context_marian.json").read_text()))
    assert out.input_context is None and out.output_context == "Das ist"
    assert out.output_current == "ein kleines Haus." and len(out.cci_scores) == 1  # --context_sensitivity_topk 1
    cci = out.cci_scores[0]
    assert abs(cci.cti_score) == max(abs(s) for s in out.cti_scores)
    assert len(cci.output_context_scores) == len(out.output_context_tokens) and cci.contrast_token is not None
    assert "Context with" not in results["context_marian"].stdout  # --no_show_viz


@pytest.mark.parametrize(("args", "expected"), [
    (["attribute", "-i", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["attribute", "-i", "x", "-a", "nope"], "Unknown attribution method 'nope'"),
    (["attribute", "-m", "no/such/dir", "-i", "x"], "is not a local directory"),
    (["attribute", "-i", "x", "--model_kwargs", "{bad"], "argument --model_kwargs: invalid JSON"),
    (["attribute", "-i", "x", "--attribution_kwargs", "[1]"], "expected a JSON object"),
    (["attribute", "-i", "x", "--step_scores", "nope"], "Unknown step function 'nope'"),
    (["attribute", "-i", "x", "-fn", "nope"], "Unknown step function 'nope'"),
    (["attribute", "-i", "x", "--attribution_aggregators", "foo"], "unknown aggregator 'foo'"),
    (["attribute", "-i", "x", "-g", "x y", "z"], "one generated text per input text"),
    (["attribute", "-i", "x", "--batch_size", "two"], "argument --batch_size/-bs: invalid int value"),
    (["attribute", "-i", "x", "--hide", "maybe"], "expected a truth value"),
    (["attribute-dataset", "-d", "missing.jsonl", "-in", "prompt"], "dataset file 'missing.jsonl' does not exist"),
    (["attribute-dataset", "-d", "data.jsonl"], "required: --input_text_field"),
    (["attribute-context", "--input_current_text", "x", "--context_sensitivity_metric", "entropy"],
     "does not compare with the contextless prediction"),
    (["attribute-context", "--input_current_text", "x", "-fn", "nope"], "Unknown step function 'nope'"),
    (["attribute-context", "--input_context_text", "x"], "input_current_text must be a non-empty string"),
    (["attribute-context", "--input_current_text", "x", "--show_viz", "maybe"], "expected a truth value"),
    ([], "required: COMMAND"),
])
def test_argument_errors_are_one_line(args, expected, capsys):
    """The same entry point in-process (no model is loaded before these are found)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, err
