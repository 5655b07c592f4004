"""inseq 0.7.1's files, both ways, and hostile files.

- Files inseq writes load here with inseq's numbers: made on the fly when inseq is installed, and the committed
  ones of tests/fixtures/inseq_files (written by tests/fixtures/make_inseq_files.py) otherwise.
- Files written here with ``format="inseq"`` load in inseq with the same numbers, and are byte for byte the file
  inseq writes for the same output.
- Every malformed or hostile file raises ``InvalidFileError`` with a message that says what is wrong.
"""

import base64
import copy
import dataclasses
import gzip
import importlib.util
import json
import random
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch

import inseq_lightning as il
from inseq_lightning import FeatureAttributionOutput, FeatureAttributionSequenceOutput, FeatureAttributionStepOutput
from inseq_lightning.data import TokenWithId, serialization
from inseq_lightning.errors import InvalidFileError, InvalidInputError
from inseq_lightning.tiny_models import tiny_gpt2, tiny_marian

FIXTURES = Path(__file__).parent / "fixtures" / "inseq_files"
PRECISION = {"float32": torch.float32, "float16": torch.float16, "float8": torch.float8_e4m3fn}
GRANULARITY = {
    "GranularFeatureAttributionSequenceOutput": "granular",
    "CoarseFeatureAttributionSequenceOutput": "coarse",
    "MultiDimensionalFeatureAttributionSequenceOutput": "multidimensional",
    "FeatureAttributionSequenceOutput": "none",
}
SEQUENCE_CLASS = {v: k for k, v in GRANULARITY.items()}


def _load_script():
    spec = importlib.util.spec_from_file_location("make_inseq_files", FIXTURES.parent / "make_inseq_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_inseq_files = _load_script()


# ---- comparing a loaded output with inseq's numbers --------------------------------------------------------
def _tensor(values) -> torch.Tensor:
    def nan(v):
        return [nan(x) for x in v] if isinstance(v, list) else float("nan") if v == "nan" else v

    return torch.tensor(nan(values), dtype=torch.float32)


def assert_numbers(got, want, precision: str = "float32") -> None:
    """``got`` holds exactly ``want`` stored in ``precision`` (what the file can hold)."""
    if want is None:
        assert got is None
        return
    expected = want if isinstance(want, torch.Tensor) else _tensor(want)
    expected = expected.float().to(PRECISION[precision]).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def pairs(tokens) -> list:
    return [[t.token, t.id] for t in tokens]


def assert_matches_expected(loaded: FeatureAttributionOutput, exp: dict, precision="float32", split=None) -> None:
    """``loaded`` holds what ``exp`` (make_inseq_files.expected: inseq's in-memory output) holds."""
    sequences = exp["sequences"] if split is None else [exp["sequences"][split]]
    assert len(loaded.sequence_attributions) == len(sequences)
    for got, want in zip(loaded.sequence_attributions, sequences):
        assert pairs(got.source) == want["source"] and pairs(got.target) == want["target"]
        assert (got.attr_pos_start, got.attr_pos_end) == (want["attr_pos_start"], want["attr_pos_end"])
        assert got.granularity == GRANULARITY[want["class"]]
        assert_numbers(got.source_attributions, want["source_attributions"], precision)
        assert_numbers(got.target_attributions, want["target_attributions"], precision)
        assert set(got.step_scores) == set(want["step_scores"])
        for name, values in want["step_scores"].items():
            assert_numbers(got.step_scores[name], values, precision)
    if split is None and exp["steps"] is not None:
        assert len(loaded.step_attributions) == len(exp["steps"])
        for got, want in zip(loaded.step_attributions, exp["steps"]):
            assert [[pair] for pair in pairs(got.target)] == want["target"]
            assert_numbers(got.source_attributions, want["source_attributions"])  # inseq keeps steps in float32
            assert_numbers(got.target_attributions, want["target_attributions"])
            assert set(got.step_scores) == set(want["step_scores"])
            for name, values in want["step_scores"].items():
                assert_numbers(got.step_scores[name], values)
            for label in ("prefix", "source"):  # kept where the step class has them
                if hasattr(got, label) and want[label] is not None:
                    assert [pairs(row) for row in getattr(got, label)] == want[label]
    else:
        assert loaded.step_attributions is None
    info = dict(exp["info"])
    if split is not None:  # inseq slices these two per file
        info["input_texts"] = [info["input_texts"][split]]
        info["generated_texts"] = [info["generated_texts"][split]]
    assert loaded.info == info


def _fixture_cases() -> list:
    """(file, output name, precision, split index) of every committed inseq file."""
    cases = []
    for path in sorted(FIXTURES.glob("*.json*")):
        if path.name.endswith(".expected.json"):
            continue
        stem = path.name.removesuffix(".json.gz").removesuffix(".json")
        name, _, variant = stem.partition(".")
        split = int(variant.rsplit("_", 1)[1]) if "_" in variant else None
        precision = variant.split("_")[0] if variant.startswith("float") else "float32"
        cases.append(pytest.param(path.name, name, precision, split, id=path.name))
    return cases


def _load_quietly(path, **kwargs) -> FeatureAttributionOutput:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention's sequence_scores are dropped with a warning
        return FeatureAttributionOutput.load(path, **kwargs)


# =============================================================================================================
# Committed inseq files (no inseq needed)
# =============================================================================================================
def test_every_save_option_of_inseq_has_a_committed_file():
    names = {p.name for p in FIXTURES.iterdir()}
    for output in ("gpt2", "marian"):
        assert {f"{output}.json", f"{output}.json.gz", f"{output}.lists.json", f"{output}.primitives.json",
                f"{output}.float16_0.json", f"{output}.float8_0.json", f"{output}.split_0.json",
                f"{output}.split_1.json", f"{output}.expected.json"} <= names
    assert all(p.stat().st_size < 32_000 for p in FIXTURES.iterdir())


@pytest.mark.parametrize(("filename", "name", "precision", "split"), _fixture_cases())
def test_committed_inseq_files_load_with_inseqs_numbers(filename, name, precision, split):
    exp = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    if name == "marian_attention":
        with pytest.warns(UserWarning, match="sequence_scores .*dropped"):
            loaded = FeatureAttributionOutput.load(FIXTURES / filename)
    else:
        loaded = FeatureAttributionOutput.load(FIXTURES / filename)
    assert_matches_expected(loaded, exp, precision, split)


def test_committed_inseq_files_keep_working_here(tmp_path):
    """What a loaded inseq file is for: aggregation, views, and our own file format."""
    loaded = FeatureAttributionOutput.load(FIXTURES / "marian.json.gz")
    aggregated = loaded.aggregate()
    assert aggregated[0].source_attributions.ndim == 2 and aggregated[0].aggregated
    assert "<table" in loaded[0].show(display=False, return_html=True)
    loaded.save(tmp_path / "ours.json")
    again = FeatureAttributionOutput.load(tmp_path / "ours.json")
    assert_numbers(again[1].source_attributions, loaded[1].source_attributions)
    assert len(again.step_attributions) == len(loaded.step_attributions) and again.info == loaded.info


@pytest.mark.parametrize("filename", [c.values[0] for c in _fixture_cases()
                                      if ".split" in c.values[0] or ".float" in c.values[0]
                                      or "occlusion" in c.values[0]])
def test_rewriting_a_committed_inseq_file_gives_inseqs_bytes(filename, tmp_path):
    """A sequence-only inseq file loaded here and saved with format="inseq" is the very file inseq wrote."""
    original = (FIXTURES / filename).read_bytes()
    precision = "float16" if ".float16" in filename else "float8" if ".float8" in filename else "float32"
    FeatureAttributionOutput.load(FIXTURES / filename).save(tmp_path / "again.json", format="inseq",
                                                            scores_precision=precision)
    assert (tmp_path / "again.json").read_bytes() == original


# =============================================================================================================
# With inseq installed: files made now, both ways
# =============================================================================================================
TEXTS = {
    "gpt2": (["Hello world", "The cat"], ["Hello world, this is", "The cat sat on the"]),
    "marian": (["Hello world", "The cat sat"], ["Le chat est", "Bonjour"]),
}
MODELS = {"gpt2": tiny_gpt2, "marian": tiny_marian}
SAVE_OPTIONS = {
    "plain": {},
    "compress": {"compress": True},
    "lists": {"ndarray_compact": False},
    "primitives": {"use_primitives": True},
    "float16": {"scores_precision": "float16"},
    "float8": {"scores_precision": "float8"},
    "split": {"split_sequences": True},
}


@pytest.fixture(scope="module")
def inseq():
    return pytest.importorskip("inseq")


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in MODELS.items()}


@pytest.fixture(scope="module")
def inseq_outputs(inseq, models):
    """inseq's outputs with step scores, with and without step outputs."""
    outputs = {}
    for name, (model, tok) in models.items():
        for steps in (True, False):
            attribution_model = inseq.load_model(copy.deepcopy(model), "saliency", tokenizer=copy.deepcopy(tok))
            outputs[name, steps] = attribution_model.attribute(*TEXTS[name], step_scores=["probability"],
                                                               output_step_attributions=steps, show_progress=False)
    return outputs


@pytest.fixture(scope="module")
def our_outputs(models):
    outputs = {}
    for name, (model, tok) in models.items():
        attribution_model = il.load_model(model, "saliency", tokenizer=tok)
        for steps, scores in ((True, ["probability"]), (False, ["probability"]), (False, [])):
            outputs[name, steps, bool(scores)] = attribution_model.attribute(
                *TEXTS[name], step_scores=scores, output_step_attributions=steps, show_progress=False)
    return outputs


def _inseq_paths(path: Path, options: dict, n: int) -> list[Path]:
    if not options.get("split_sequences"):
        return [path]
    return [path.with_name(f"{path.stem}_{i}.json{'.gz' if options.get('compress') else ''}") for i in range(n)]


@pytest.mark.parametrize("option", list(SAVE_OPTIONS))
@pytest.mark.parametrize("model", list(MODELS))
def test_files_inseq_writes_load_here(inseq, inseq_outputs, model, option, tmp_path):
    options = SAVE_OPTIONS[option]
    out = inseq_outputs[model, True]
    exp = json.loads(json.dumps(make_inseq_files.expected(out)))
    out.save(tmp_path / "out.json", **options)
    paths = _inseq_paths(tmp_path / "out.json", options, len(out))
    for i, path in enumerate(paths):
        loaded = FeatureAttributionOutput.load(path)
        assert_matches_expected(loaded, exp, options.get("scores_precision", "float32"),
                                i if options.get("split_sequences") else None)


def _assert_inseq_holds(theirs, ours, precision="float32", split=None) -> None:
    """An output loaded by inseq holds our output's tokens, numbers, positions and info."""
    sequences = ours.sequence_attributions if split is None else [ours.sequence_attributions[split]]
    assert len(theirs.sequence_attributions) == len(sequences)
    for got, want in zip(theirs.sequence_attributions, sequences):
        assert type(got).__name__ == SEQUENCE_CLASS[want.granularity]
        assert pairs(got.source) == pairs(want.source) and pairs(got.target) == pairs(want.target)
        assert (got.attr_pos_start, got.attr_pos_end) == (want.attr_pos_start, want.attr_pos_end)
        assert_numbers(got.source_attributions, want.source_attributions, precision)
        assert_numbers(got.target_attributions, want.target_attributions, precision)
        assert set(got.step_scores) == set(want.step_scores)
        for name, values in want.step_scores.items():
            assert_numbers(got.step_scores[name], values, precision)
    info = json.loads(json.dumps(ours.info))
    if split is not None:
        info = {k: [v[split]] if k in ("input_texts", "generated_texts") else v for k, v in info.items()}
    assert theirs.info == info


@pytest.mark.parametrize("option", ["plain", "compress", "lists", "float16", "float8", "split"])
@pytest.mark.parametrize("scores", [True, False])
@pytest.mark.parametrize("model", list(MODELS))
def test_files_written_here_load_in_inseq(inseq, our_outputs, model, scores, option, tmp_path):
    options = SAVE_OPTIONS[option]
    ours = our_outputs[model, False, scores]
    ours.save(tmp_path / "out.json", format="inseq", **options)
    for i, path in enumerate(_inseq_paths(tmp_path / "out.json", options, len(ours))):
        theirs = inseq.FeatureAttributionOutput.load(path, decompress=options.get("compress", False))
        _assert_inseq_holds(theirs, ours, options.get("scores_precision", "float32"),
                            i if options.get("split_sequences") else None)
        back = FeatureAttributionOutput.load(path)  # and here, unchanged
        for j, seq in enumerate(back):
            want = ours[i if options.get("split_sequences") else j]
            assert_numbers(seq.source_attributions, want.source_attributions, options.get("scores_precision", "float32"))
            assert_numbers(seq.target_attributions, want.target_attributions, options.get("scores_precision", "float32"))


@pytest.mark.parametrize("model", list(MODELS))
def test_inseq_aggregates_what_was_written_here_as_we_do(inseq, our_outputs, model, tmp_path):
    ours = our_outputs[model, False, True]
    ours.save(tmp_path / "out.json", format="inseq")
    theirs = inseq.FeatureAttributionOutput.load(tmp_path / "out.json")
    for a, b in zip(theirs.aggregate(), ours.aggregate()):
        for name in ("source_attributions", "target_attributions"):
            if getattr(b, name) is not None:
                torch.testing.assert_close(getattr(a, name), getattr(b, name), equal_nan=True, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["attention", "occlusion"])
def test_each_granularity_is_written_as_inseqs_class(inseq, models, method, tmp_path):
    model, tok = copy.deepcopy(models["marian"][0]), models["marian"][1]
    model.set_attn_implementation("eager")
    ours = il.load_model(model, method, tokenizer=tok).attribute(*TEXTS["marian"], show_progress=False)
    ours.save(tmp_path / "out.json", format="inseq")
    theirs = inseq.FeatureAttributionOutput.load(tmp_path / "out.json")
    _assert_inseq_holds(theirs, ours)
    assert_numbers(FeatureAttributionOutput.load(tmp_path / "out.json")[1].source_attributions,
                   ours[1].source_attributions)


@pytest.mark.parametrize("option", ["plain", "compress", "lists", "primitives"])
@pytest.mark.parametrize("model", list(MODELS))
def test_step_attributions_written_for_inseq(inseq, inseq_outputs, our_outputs, model, option, tmp_path):
    """inseq 0.7.1's load cannot read any file with step outputs, its own included; we write them as inseq does
    (its own JSON reader gives back our arrays) and read them back here."""
    from inseq.utils.serialization import json_advanced_load

    options = SAVE_OPTIONS[option]
    ours = our_outputs[model, True, True]
    with pytest.warns(UserWarning, match="cannot read files holding step attributions"):
        ours.save(tmp_path / "ours.json", format="inseq", **options)
    inseq_outputs[model, True].save(tmp_path / "theirs.json", **options)
    if option != "primitives":  # inseq's documented: use_primitives files are not for its load
        for name in ("ours.json", "theirs.json"):
            with pytest.raises(AttributeError, match="_recover_from_safetensors"):
                inseq.FeatureAttributionOutput.load(tmp_path / name, decompress=option == "compress")
        raw = json_advanced_load(tmp_path / "ours.json", decompression=option == "compress")
        for got, want in zip(raw.step_attributions, ours.step_attributions):
            assert pairs(row[0] for row in got.target) == pairs(want.target)
            assert_numbers(torch.from_numpy(got.step_scores["probability"].copy()), want.step_scores["probability"])
            attributions = got.source_attributions if model == "marian" else got.target_attributions
            assert_numbers(torch.from_numpy(attributions.copy()),
                           want.source_attributions if model == "marian" else want.target_attributions)
    back = FeatureAttributionOutput.load(tmp_path / "ours.json")
    assert len(back.step_attributions) == len(ours.step_attributions)
    for got, want in zip(back.step_attributions, ours.step_attributions):
        assert pairs(got.target) == pairs(want.target)
        assert_numbers(got.source_attributions, want.source_attributions)
        assert_numbers(got.target_attributions, want.target_attributions)
        assert_numbers(got.step_scores["probability"], want.step_scores["probability"])


@pytest.mark.parametrize("option", list(SAVE_OPTIONS))
@pytest.mark.parametrize("model", list(MODELS))
def test_inseq_files_rewritten_here_are_byte_identical(inseq, inseq_outputs, model, option, tmp_path):
    options = SAVE_OPTIONS[option]
    out = inseq_outputs[model, False]
    out.save(tmp_path / "theirs.json", **options)
    for i, path in enumerate(_inseq_paths(tmp_path / "theirs.json", options, len(out))):
        again = tmp_path / f"ours_{i}.json"
        FeatureAttributionOutput.load(path).save(again, format="inseq",
                                                 **{k: v for k, v in options.items() if k != "split_sequences"})
        assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(("filename", "name", "precision", "split"),
                         [c for c in _fixture_cases() if not any(s in c.values[0] for s in (".primitives", "attention"))
                          and (".split" in c.values[0] or ".float" in c.values[0] or "occlusion" in c.values[0])])
def test_committed_files_are_what_inseq_loads(inseq, filename, name, precision, split):
    theirs = inseq.FeatureAttributionOutput.load(FIXTURES / filename)
    ours = FeatureAttributionOutput.load(FIXTURES / filename)
    for a, b in zip(theirs.sequence_attributions, ours.sequence_attributions):
        assert pairs(a.source) == pairs(b.source) and pairs(a.target) == pairs(b.target)
        assert_numbers(b.source_attributions, a.source_attributions)
        assert_numbers(b.target_attributions, a.target_attributions)
    assert theirs.info == ours.info


# =============================================================================================================
# Hostile and malformed files: one InvalidFileError each, saying what is wrong
# =============================================================================================================
def assert_rejected(path: Path, match: str, **kwargs) -> InvalidFileError:
    with pytest.raises(InvalidFileError, match=match) as caught:
        FeatureAttributionOutput.load(path, **kwargs)
    assert type(caught.value) is InvalidFileError and str(path) in str(caught.value)
    assert "not a readable attribution file" not in str(caught.value)  # an explicit check, not the safety net
    return caught.value


def small_output(with_steps: bool = True) -> FeatureAttributionOutput:
    """A decoder-only output made by hand: prompt 'a b', one generated token 'c'."""
    tokens = [TokenWithId("a", 1), TokenWithId("b", 2), TokenWithId("c", 3)]
    seq = FeatureAttributionSequenceOutput(source=tokens[:2], target=tokens, target_attributions=torch.rand(3, 1, 4),
                                           step_scores={"probability": torch.rand(1)}, attr_pos_start=2,
                                           attr_pos_end=3)
    steps = [FeatureAttributionStepOutput(None, torch.rand(1, 3, 4), {"probability": seq.step_scores["probability"]},
                                          [tokens[2]])] if with_steps else None
    return FeatureAttributionOutput([seq], steps, {"attribution_method": "saliency", "input_texts": ["a b"]})


@pytest.fixture()
def native(tmp_path):
    """(path, payload) of a valid inseq-lightning file with plain-list tensors (easy to edit)."""
    path = tmp_path / "native.json"
    small_output().save(path, use_primitives=True)
    return path, json.loads(path.read_text())


@pytest.fixture()
def inseq_file(tmp_path):
    """(path, payload) of a copy of a committed inseq file with step outputs."""
    path = tmp_path / "inseq.json"
    return path, json.loads((FIXTURES / "gpt2.json").read_text())


def write(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


def _seq(payload):  # the first sequence's fields in an inseq file
    return payload["attributes"]["sequence_attributions"][0]["attributes"]


def _step(payload):
    return payload["attributes"]["step_attributions"][0]["attributes"]


def _safetensors_blob(dtype: str, shape: list, data: bytes, offsets=None, header_size=None) -> str:
    header = json.dumps({"attribution": {"dtype": dtype, "shape": shape,
                                         "data_offsets": offsets or [0, len(data)]}}).encode()
    size = len(header) if header_size is None else header_size
    return base64.b64encode(size.to_bytes(8, "little") + header + data).decode()


def test_a_pickle_is_not_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    import pickle

    (tmp_path / "evil.json").write_bytes(pickle.dumps(Boom()))
    assert_rejected(tmp_path / "evil.json", "not UTF-8 JSON text")
    (tmp_path / "evil.json.gz").write_bytes(gzip.compress(pickle.dumps(Boom())))
    assert_rejected(tmp_path / "evil.json.gz", "not UTF-8 JSON text")


def test_not_json(tmp_path):
    (tmp_path / "cut.json").write_text((FIXTURES / "gpt2.json").read_text()[:500])
    assert_rejected(tmp_path / "cut.json", "not valid JSON")
    assert_rejected(write(tmp_path / "list.json", [1, 2]), "holds a list, not an attribution output object")
    assert_rejected(write(tmp_path / "other.json", {"hello": 1}), "neither inseq-lightning's layout")


def test_json_nested_too_deeply(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    assert_rejected(tmp_path / "deep.json", "nested too deeply")


def test_broken_gzip(tmp_path):
    data = gzip.compress((FIXTURES / "gpt2.json").read_bytes())
    (tmp_path / "cut.json.gz").write_bytes(data[: len(data) // 2])
    assert_rejected(tmp_path / "cut.json.gz", "not valid gzip data")
    (tmp_path / "bad.json.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    assert_rejected(tmp_path / "bad.json.gz", "not valid gzip data")


def test_a_gzip_bomb_stops_at_the_default_limit(tmp_path):
    """0.6 MiB of gzip expanding to 600 MiB: decompression stops at 256 MiB, before any JSON is parsed."""
    member = gzip.compress(b"0" * 2**20, compresslevel=9, mtime=0)
    (tmp_path / "bomb.json.gz").write_bytes(gzip.compress(b'{"format": "', mtime=0) + member * 600)
    assert (tmp_path / "bomb.json.gz").stat().st_size < 2**20
    start = time.perf_counter()
    tracemalloc.start()
    try:
        error = assert_rejected(tmp_path / "bomb.json.gz", "expands past max_decompressed_bytes=268435456")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "max_decompressed_bytes" in str(error)
    assert peak < serialization.MAX_DECOMPRESSED_BYTES + 32 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert time.perf_counter() - start < 30


def test_the_decompression_limit_is_configurable(tmp_path):
    assert len(FeatureAttributionOutput.load(FIXTURES / "gpt2.json.gz")) == 2  # 19 KB once expanded
    assert_rejected(FIXTURES / "gpt2.json.gz", "expands past max_decompressed_bytes=4096",
                    max_decompressed_bytes=4096)
    with pytest.raises(InvalidInputError, match="positive number of bytes"):
        FeatureAttributionOutput.load(FIXTURES / "gpt2.json.gz", max_decompressed_bytes=0)


def test_a_gzipped_array_inside_the_file_counts_against_the_limit(inseq_file):
    path, payload = inseq_file
    bomb = gzip.compress(b"\x00" * (8 * 2**20), mtime=0)
    assert len(bomb) < 2**16
    _step(payload)["target_attributions"] = {"__ndarray__": "b64.gz:" + base64.b64encode(bomb).decode(),
                                             "dtype": "float32", "shape": [1, 2**21], "Corder": True}
    assert_rejected(write(path, payload), r"step_attributions\[0\]\.target_attributions: gzip data expands past "
                                          "max_decompressed_bytes=1048576", max_decompressed_bytes=2**20)


def test_unknown_version(native):
    path, payload = native
    payload["version"] = 2
    assert_rejected(write(path, payload), "version: unsupported version 2: this inseq-lightning reads version 1")
    payload["version"] = "1"
    assert_rejected(write(path, payload), "unsupported version '1'")
    payload["version"], payload["format"] = 1, "something.else"
    assert_rejected(write(path, payload), "unknown format 'something.else'")


def test_unknown_inseq_object_types_are_not_imported(inseq_file):
    path, payload = inseq_file
    _seq(payload)["source"][0]["__instance_type__"] = ["evil_module_xyz", "Payload"]
    assert_rejected(write(path, payload), r"source\[0\]: unsupported object type \['evil_module_xyz', 'Payload'\]")
    assert "evil_module_xyz" not in sys.modules
    payload = json.loads((FIXTURES / "gpt2.json").read_text())
    payload["attributes"]["sequence_attributions"][0]["__instance_type__"][1] = "FeatureAttributionSequenceOutputV2"
    assert_rejected(write(path, payload), "unsupported object type")
    payload = json.loads((FIXTURES / "gpt2.json").read_text())
    payload["attributes"]["info"]["callback"] = {"__instance_type__": ["builtins", "eval"], "attributes": {}}
    assert_rejected(write(path, payload), r"info\['callback'\]: unsupported object type")


def test_wrong_types(native, inseq_file):
    cases = [
        (lambda p: p["sequence_attributions"][0]["target"][0].__setitem__(1, "3"), "integer id"),
        (lambda p: p["sequence_attributions"][0].__setitem__("attr_pos_start", "2"), "expected an integer position"),
        (lambda p: p.__setitem__("sequence_attributions", {}), "sequence_attributions: expected a list"),
        (lambda p: p["sequence_attributions"][0].__setitem__("target_attributions", 5), "expected a tensor"),
        (lambda p: p["sequence_attributions"][0].__setitem__("step_scores", [1]), "expected an object of named"),
        (lambda p: p["sequence_attributions"][0].__setitem__("granularity", "fine"), "unknown granularity 'fine'"),
        (lambda p: p["sequence_attributions"][0].__setitem__("aggregated", "no"), "expected true or false"),
        (lambda p: p["sequence_attributions"][0].__setitem__("colour", "red"), "unexpected field\\(s\\) 'colour'"),
        (lambda p: p.__setitem__("info", [1]), "info: expected an object"),
        (lambda p: p["sequence_attributions"][0]["target_attributions"].__setitem__("__tensor__", "pickle"),
         "unknown tensor encoding 'pickle'"),
    ]
    path, original = native
    for mutate, match in cases:
        payload = copy.deepcopy(original)
        mutate(payload)
        assert_rejected(write(path, payload), match)
    path, original = inseq_file
    cases = [
        (lambda p: _seq(p)["target"][0]["attributes"].__setitem__("token", 7), "a token string and an integer id"),
        (lambda p: _seq(p).__setitem__("target_attributions", [1.0]), "expected a base64 string"),
        (lambda p: _step(p)["step_scores"]["probability"].__setitem__("dtype", "object"),
         "unsupported array dtype 'object'"),
        (lambda p: _step(p).__setitem__("target", "x"), "expected a list of token rows"),
    ]
    for mutate, match in cases:
        payload = copy.deepcopy(original)
        mutate(payload)
        assert_rejected(write(path, payload), match)


def test_shapes_that_do_not_match_the_tokens(native, inseq_file):
    path, payload = native
    payload["sequence_attributions"][0]["target_attributions"] = {"__tensor__": "list", "shape": [5, 1, 4],
                                                                  "data": [[[0.0] * 4]] * 5}
    assert_rejected(write(path, payload), r"target_attributions: shape \[5, 1, 4\] has 5 token rows for 3 target")
    payload["sequence_attributions"][0]["target_attributions"] = {"__tensor__": "list", "shape": [3, 2, 4],
                                                                  "data": [[[0.0] * 4] * 2] * 3}
    assert_rejected(write(path, payload), "has 2 step columns for the 1 attributed steps")
    payload["sequence_attributions"][0]["target_attributions"] = {"__tensor__": "list", "shape": [3],
                                                                  "data": [0.0] * 3}
    assert_rejected(write(path, payload), r"shape \[3\]; expected \[tokens, steps, ...\]")
    path, payload = inseq_file  # "Hello world" -> "Hello world,": 6 target tokens, 1 step
    _seq(payload)["target_attributions"] = _safetensors_blob("F32", [7, 1, 4], bytes(112))
    assert_rejected(write(path, payload), r"target_attributions: shape \[7, 1, 4\] has 7 token rows for 6 target")
    payload = json.loads((FIXTURES / "marian.json").read_text())  # "Hello" -> 3 source tokens
    _seq(payload)["source_attributions"] = _safetensors_blob("F32", [4, 2, 4], bytes(128))
    assert_rejected(write(path, payload), r"source_attributions: shape \[4, 2, 4\] has 4 token rows for 3 source")


def test_positions_outside_the_tokens(native):
    path, payload = native
    payload["sequence_attributions"][0]["attr_pos_start"] = 3
    payload["sequence_attributions"][0]["attr_pos_end"] = 2
    assert_rejected(write(path, payload), "attr_pos_start=3, attr_pos_end=2 do not fit its 3 target tokens")


def test_more_step_scores_than_steps(native, inseq_file):
    path, payload = native
    payload["sequence_attributions"][0]["step_scores"]["probability"] = {"__tensor__": "list", "shape": [3],
                                                                         "data": [0.1, 0.2, 0.3]}
    assert_rejected(write(path, payload), r"step_scores\['probability'\]: shape \[3\] holds 3 scores for 1 steps")
    path, payload = inseq_file
    _seq(payload)["step_scores"]["probability"] = _safetensors_blob("F32", [4], bytes(16))
    assert_rejected(write(path, payload), "holds 4 scores for 1 steps")
    payload = json.loads((FIXTURES / "gpt2.json").read_text())  # a step output with two scores for one token
    _step(payload)["step_scores"]["probability"] = {"__ndarray__": "b64:" + base64.b64encode(bytes(8)).decode(),
                                                    "dtype": "float32", "shape": [2]}
    assert_rejected(write(path, payload), "does not hold one row for each of the 1 sequences")


def test_sizes_beyond_the_data(native, inseq_file):
    path, original = inseq_file
    cases = [
        (_safetensors_blob("F32", [6, 1, 4], bytes(16)),
         r"declared shape \[6, 1, 4\] of float32 needs 96 bytes, but the data holds 16"),
        (_safetensors_blob("F32", [2**40, 2**40], bytes(16)), "needs 4835703278458516698824704 bytes"),
        (_safetensors_blob("F32", [1], bytes(4), header_size=10**12), "header declares 1000000000000 bytes"),
        (_safetensors_blob("F32", [6, 1, 4], bytes(96), offsets=[0, 4000]), "reach past the 96 bytes of data"),
        (_safetensors_blob("F32", [-1], bytes(4)), "shape must be a list of non-negative integers"),
        (_safetensors_blob("PICKLE", [1], bytes(4)), "unsupported safetensors dtype 'PICKLE'"),
        (base64.b64encode(b"\x01\x02").decode(), "shorter than its 8-byte header size"),
        ("not base64!", "not valid base64"),
    ]
    for blob, match in cases:
        payload = copy.deepcopy(original)
        _seq(payload)["target_attributions"] = blob
        assert_rejected(write(path, payload), match)
    payload = copy.deepcopy(original)
    _step(payload)["target_attributions"]["shape"] = [1, 500, 4]
    assert_rejected(write(path, payload), r"declared shape \[1, 500, 4\] of float32 needs 8000 bytes")
    path, payload = native
    payload["sequence_attributions"][0]["target_attributions"]["shape"] = [3, 1, 40]
    assert_rejected(write(path, payload), r"data of shape \[3, 1, 4\] does not match its declared shape \[3, 1, 40\]")


def test_ragged_lists(tmp_path):
    payload = json.loads((FIXTURES / "gpt2.primitives.json").read_text())
    payload["step_attributions"][0]["target_attributions"][0][1] = [1.0]
    assert_rejected(write(tmp_path / "ragged.json", payload), "not a rectangular list of numbers")
    payload = json.loads((FIXTURES / "gpt2.primitives.json").read_text())
    payload["step_attributions"][0]["target_attributions"][0][1][0] = "x"
    assert_rejected(write(tmp_path / "ragged.json", payload), "not a rectangular list of numbers")


def _mutations(value, path=()):
    """Paths to every value in a JSON tree."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _mutations(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from _mutations(v, (*path, i))


@pytest.mark.parametrize("source", ["gpt2.json", "marian.primitives.json", "native"])
def test_random_damage_gives_only_explained_errors(source, tmp_path):
    """Values replaced at random anywhere in a file: each file either loads or says what is wrong."""
    if source == "native":
        small_output().save(tmp_path / "native.json")
        original = json.loads((tmp_path / "native.json").read_text())
    else:
        original = json.loads((FIXTURES / source).read_text())
    paths = [p for p in _mutations(original) if p]
    rng = random.Random(0)
    replacements = [None, -1, 2**70, "x", [], {}, 1.5, True, [1, "a"], {"__ndarray__": 1}, {"__tensor__": 1},
                    {"__instance_type__": ["os", "system"], "attributes": {}}, float("nan")]
    path = tmp_path / "damaged.json"
    for _ in range(150):
        payload = copy.deepcopy(original)
        where = rng.choice(paths)
        node = payload
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = copy.deepcopy(rng.choice(replacements))
        write(path, payload)
        try:
            _load_quietly(path)
        except InvalidFileError as err:
            assert type(err) is InvalidFileError
            assert "not a readable attribution file" not in str(err), (where, str(err))


def test_truncated_and_flipped_bytes_give_only_our_error(tmp_path):
    rng = random.Random(1)
    path = tmp_path / "damaged.json"
    for name in ("gpt2.json.gz", "gpt2.split_0.json"):
        data = (FIXTURES / name).read_bytes()
        for _ in range(60):
            damaged = bytearray(data[: rng.randrange(1, len(data))] if rng.random() < 0.5 else data)
            for _ in range(rng.randrange(1, 4)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path.write_bytes(bytes(damaged))
            try:
                _load_quietly(path)
            except InvalidFileError as err:
                assert type(err) is InvalidFileError


def test_a_missing_file_is_not_a_file_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        FeatureAttributionOutput.load(tmp_path / "missing.json")


def test_our_own_files_are_checked_like_inseqs(tmp_path):
    """The native layout goes through the same checks, and still round-trips (steps included)."""
    out = small_output()
    for options in ({}, {"use_primitives": True}, {"compress": True, "scores_precision": "float16"}):
        out.save(tmp_path / "out.json", overwrite=True, **options)
        back = FeatureAttributionOutput.load(tmp_path / "out.json")
        precision = options.get("scores_precision", "float32")
        assert_numbers(back[0].target_attributions, out[0].target_attributions, precision)
        assert_numbers(back.step_attributions[0].target_attributions, out.step_attributions[0].target_attributions,
                       precision)
        assert dataclasses.asdict(back[0])["source"] == dataclasses.asdict(out[0])["source"]
        assert back.info == out.info
