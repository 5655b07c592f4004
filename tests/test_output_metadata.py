"""What an output says about itself survives the monitor and the round trip through a file."""

import torch

import inseq_lightning as il
from inseq_lightning import FeatureAttributionOutput
from inseq_lightning.monitor import ProbeMonitor
from inseq_lightning.monitor.probes import Probe
from inseq_lightning.sinks import FileSink
from inseq_lightning.tiny_models import tiny_gpt2

PROBES = [Probe("the cat sat", " on the mat", name="cat"), Probe("Hello world", ", this is a cat", name="hello")]


def test_each_probe_output_keeps_its_method_texts_and_arguments(tmp_path):
    model, tok = tiny_gpt2()
    monitor = ProbeMonitor(PROBES, method="integrated_gradients", step_scores=("probability",),
                           method_kwargs={"n_steps": 7})
    report = monitor.run(model, tok, 3, sinks=[FileSink(tmp_path)])
    for probe, result in zip(PROBES, report.results):
        info = result.output.info
        assert info["attribution_method"] == "integrated_gradients"
        assert info["input_texts"] == [probe.prompt]
        assert info["generated_texts"] == [probe.prompt + probe.target]
        assert info["attribution_args"]["n_steps"] == 7 and info["step_scores"] == ["probability"]
        assert result.output.step_attributions is None  # not asked for
        loaded = FeatureAttributionOutput.load(tmp_path / "step_3" / f"{probe.name}.json")
        assert loaded.info["input_texts"] == [probe.prompt]
        assert loaded.info["attribution_method"] == "integrated_gradients"


def _assert_same_steps(loaded, original):
    assert len(loaded) == len(original)
    for a, b in zip(loaded, original):
        assert [t.id for t in a.target] == [t.id for t in b.target]
        assert torch.allclose(a.target_attributions, b.target_attributions, equal_nan=True)
        assert torch.equal(a.step_scores["probability"], b.step_scores["probability"])


def test_step_attributions_are_saved_and_loaded(tmp_path):
    model, tok = tiny_gpt2()
    out = il.load_model(model, "saliency", tokenizer=tok).attribute(
        ["the cat sat", "Hello world"], ["the cat sat on the mat", "Hello world, this"],
        output_step_attributions=True, step_scores=["probability"], show_progress=False)
    out.save(tmp_path / "all.json")
    _assert_same_steps(FeatureAttributionOutput.load(tmp_path / "all.json").step_attributions, out.step_attributions)

    out.save(tmp_path / "one.json", split_sequences=True)
    for i, seq in enumerate(out.sequence_attributions):
        loaded = FeatureAttributionOutput.load(tmp_path / f"one_{i}.json")
        n_steps = seq.attr_pos_end - seq.attr_pos_start
        assert len(loaded.step_attributions) == n_steps
        for k, step in enumerate(loaded.step_attributions):
            # step k of sequence i alone equals column k of its sequence output, over the prefix it sees (inseq's)
            assert step.target[0].id == seq.generated[k].id
            rows = step.target_attributions.shape[1]
            assert rows == seq.attr_pos_start + k
            assert torch.allclose(step.target_attributions[0], seq.target_attributions[:rows, k], equal_nan=True)
            assert step.step_scores["probability"][0] == seq.step_scores["probability"][k]


def test_step_attributions_of_several_batches_stay_one_row_per_sequence(tmp_path):
    model, tok = tiny_gpt2()
    texts = (["the cat sat", "Hello world", "Paris is"], ["the cat sat on the mat", "Hello world, this", "Paris is the capital"])
    attr_model = il.load_model(model, "saliency", tokenizer=tok)
    whole = attr_model.attribute(*texts, output_step_attributions=True, step_scores=["probability"], show_progress=False)
    batched = attr_model.attribute(*texts, output_step_attributions=True, step_scores=["probability"],
                                   show_progress=False, batch_size=1)
    assert len(batched.step_attributions) == len(whole.step_attributions)
    for a, b in zip(batched.step_attributions, whole.step_attributions):
        assert [t.id for t in a.target] == [t.id for t in b.target]
        assert torch.allclose(a.step_scores["probability"], b.step_scores["probability"], atol=1e-6)
        rows = min(a.target_attributions.shape[1], b.target_attributions.shape[1])
        assert torch.allclose(a.target_attributions[:, :rows], b.target_attributions[:, :rows], equal_nan=True,
                              atol=1e-6)
    batched.save(tmp_path / "seq.json", split_sequences=True)
    for i, seq in enumerate(batched.sequence_attributions):
        loaded = FeatureAttributionOutput.load(tmp_path / f"seq_{i}.json")
        assert [s.target[0].id for s in loaded.step_attributions] == [t.id for t in seq.generated]
