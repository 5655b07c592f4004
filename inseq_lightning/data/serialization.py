"""Save and load attribution outputs as JSON (optionally gzipped), in this library's layout or in inseq 0.7.1's.

Loading parses JSON, base64 and safetensors headers only: nothing is unpickled, imported or evaluated, and
every malformed or hostile file raises one error, :class:`~inseq_lightning.errors.InvalidFileError`.

Layouts:

- inseq-lightning's (``format="inseq_lightning"``, the default): ``{"format": "inseq_lightning.
  FeatureAttributionOutput", "version": 1, "sequence_attributions": [...], "step_attributions": [...],
  "info": {...}}``; tensors are ``{"__tensor__": "safetensors", "data": <base64>}`` (or ``"list"`` with
  ``use_primitives``).
- inseq 0.7.1's ``FeatureAttributionOutput.save`` (``format="inseq"``; json-tricks style): objects are
  ``{"__instance_type__": [module, class], "attributes": {...}}`` (bare attribute dicts with
  ``use_primitives``); sequence tensors are base64 safetensors strings (key ``attribution``, in
  ``scores_precision``); step tensors are ``{"__ndarray__": "b64:..." | "b64.gz:..." | [...], "dtype",
  "shape"}`` (bare nested lists with ``use_primitives``).
"""

import base64
import binascii
import dataclasses
import gzip
import io
import json
import math
import warnings
import zlib
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..errors import InvalidFileError, InvalidInputError

FORMAT_VERSION = 1
FORMATS = ("inseq_lightning", "inseq")
#: Default cap on the bytes a file may expand to when decompressed (gzip files and inseq's ``b64.gz`` arrays);
#: pass ``max_decompressed_bytes`` to :meth:`FeatureAttributionOutput.load` to change it for one call.
MAX_DECOMPRESSED_BYTES = 256 * 2**20

_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "float8": torch.float8_e4m3fn}
_NATIVE_FORMAT = "inseq_lightning.FeatureAttributionOutput"
_MAX_DEPTH = 64  # nesting of info values and lists (JSON nests deeper only in hostile files)

# ---- inseq 0.7.1's class names -------------------------------------------------------------------
_INSEQ_MODULE = "inseq.data.attribution"
_INSEQ_TOKEN = ("inseq.utils.typing", "TokenWithId")
_INSEQ_OUTPUT = (_INSEQ_MODULE, "FeatureAttributionOutput")
_SEQUENCE_CLASSES = {
    "granular": "GranularFeatureAttributionSequenceOutput",
    "coarse": "CoarseFeatureAttributionSequenceOutput",
    "multidimensional": "MultiDimensionalFeatureAttributionSequenceOutput",
    "none": "FeatureAttributionSequenceOutput",
}
_STEP_CLASSES = {k: v.replace("Sequence", "Step") for k, v in _SEQUENCE_CLASSES.items()}
_GRANULARITY_OF = {name: g for g, name in (*_SEQUENCE_CLASSES.items(), *_STEP_CLASSES.items())}
_INSEQ_SEQUENCE_FIELDS = {"attr_pos_end", "attr_pos_start", "sequence_scores", "source", "source_attributions",
                          "step_scores", "target", "target_attributions"}
_INSEQ_STEP_FIELDS = {"prefix", "sequence_scores", "source", "source_attributions", "step_scores", "target",
                      "target_attributions"}

# ---- dtypes a file may declare ---------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_NUMPY_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
    "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}


# =====================================================================================================
# Saving
# =====================================================================================================
def save_output(output, path, overwrite=False, compress=False, ndarray_compact=True, use_primitives=False,
                split_sequences=False, scores_precision="float32", format="inseq_lightning") -> None:
    if scores_precision not in _PRECISIONS:
        raise ValueError(f"scores_precision must be one of {', '.join(_PRECISIONS)}, not {scores_precision!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, not {format!r}")
    if format == "inseq":
        _save_inseq(output, path, overwrite, compress, ndarray_compact, use_primitives, split_sequences,
                    scores_precision)
        return
    path = Path(path)
    groups = [[s] for s in output.sequence_attributions] if split_sequences else [output.sequence_attributions]
    for i, sequences in enumerate(groups):
        payload = {
            "format": _NATIVE_FORMAT,
            "version": FORMAT_VERSION,
            "sequence_attributions": [_to_json(s.to_dict(), scores_precision, use_primitives) for s in sequences],
            "step_attributions": _step_payload(output, sequences, split_sequences, i, scores_precision, use_primitives),
            "info": _to_json(output.info, scores_precision, use_primitives),
        }
        target = path if not split_sequences else path.with_name(f"{path.stem}_{i}{path.suffix}")
        _write(target, json.dumps(payload, indent=None if ndarray_compact else 2, allow_nan=True), compress,
               overwrite, compresslevel=9)


def _encode_tensor(t: torch.Tensor, precision: str, use_primitives: bool) -> dict[str, Any]:
    if use_primitives:
        return {"__tensor__": "list", "data": t.detach().cpu().float().tolist(), "shape": list(t.shape)}
    dtype = _PRECISIONS[precision] if t.is_floating_point() else t.dtype
    blob = safetensors.torch.save({"t": t.detach().cpu().to(dtype).contiguous()})
    return {"__tensor__": "safetensors", "data": base64.b64encode(blob).decode("ascii")}


def _to_json(value: Any, precision: str, use_primitives: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return _encode_tensor(value, precision, use_primitives)
    if isinstance(value, dict):
        return {k: _to_json(v, precision, use_primitives) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v, precision, use_primitives) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return {"__nan__": True}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _write(path: Path, text: str, compress: bool, overwrite: bool, compresslevel: int) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.write_bytes(_gzip(text.encode("utf-8"), compresslevel))
    else:
        path.write_text(text, encoding="utf-8")


def _gzip(data: bytes, compresslevel: int) -> bytes:
    """gzip without a timestamp, byte for byte as inseq's ``gzip_compress`` writes it."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=compresslevel, mtime=0) as f:
        f.write(data)
    return buffer.getvalue()


def _step_payload(output, sequences, split_sequences: bool, index: int, precision: str, use_primitives: bool):
    """The per-step outputs of the sequences being written (None when the output has none)."""
    if output.step_attributions is None:
        return None
    if split_sequences:
        from .outputs import output_for_sequence

        steps = output_for_sequence(output, index).step_attributions
    else:
        steps = output.step_attributions
    return [_to_json(step.to_dict(), precision, use_primitives) for step in steps]


# ---- inseq 0.7.1's layout ------------------------------------------------------------------------------
def _save_inseq(output, path, overwrite, compress, ndarray_compact, use_primitives, split_sequences, precision):
    """What inseq 0.7.1's ``FeatureAttributionOutput.save`` writes for the same output (same file names, keys,
    encodings and JSON formatting). As inseq does, ``split_sequences`` drops the step attributions."""
    from .outputs import output_for_sequence

    if split_sequences:
        stem = str(path).split(".json")[0]
        parts = [(Path(f"{stem}_{i}.json{'.gz' if compress else ''}"), output_for_sequence(output, i), False)
                 for i in range(len(output.sequence_attributions))]
    else:
        parts = [(Path(path), output, output.step_attributions is not None)]
        if output.step_attributions is not None:
            warnings.warn(
                "inseq 0.7.1's FeatureAttributionOutput.load cannot read files holding step attributions, its own "
                "included (AttributeError: '_recover_from_safetensors'); inseq-lightning reads them. For inseq, save "
                "with split_sequences=True (which drops them, as inseq does) or from an output without them.",
                UserWarning, stacklevel=3)
    enc = _InseqEncoder(ndarray_compact, compress, use_primitives, precision)
    granularity = output.sequence_attributions[0].granularity if output.sequence_attributions else None
    for target, part, with_steps in parts:
        attrs = {
            "info": enc.value(part.info),
            "sequence_attributions": [enc.sequence(s) for s in part.sequence_attributions],
            "step_attributions": [enc.step(s, granularity) for s in part.step_attributions] if with_steps else None,
        }
        text = json.dumps(enc.obj(_INSEQ_OUTPUT, attrs), indent=4, sort_keys=True, allow_nan=True)
        _write(target, text, compress, overwrite, compresslevel=5)


class _InseqEncoder:
    def __init__(self, ndarray_compact, compression: bool, use_primitives: bool, precision: str):
        self.compact, self.compression, self.primitives = ndarray_compact, compression, use_primitives
        self.precision = precision

    def obj(self, kind: tuple[str, str], attrs: dict) -> dict:
        return attrs if self.primitives else {"__instance_type__": list(kind), "attributes": attrs}

    def token(self, t) -> dict:
        return self.obj(_INSEQ_TOKEN, {"id": int(t.id), "token": str(t.token)})

    def safetensor(self, t: torch.Tensor | None) -> str | None:
        """inseq's ``convert_to_safetensor``, base64-encoded as its JSON encoder writes bytes."""
        if t is None:
            return None
        t = _canonical_nan(t.detach().cpu())
        if t.is_floating_point() or self.precision != "float32":
            t = t.to(_PRECISIONS[self.precision])
        return base64.b64encode(safetensors.torch.save({"attribution": t.contiguous()})).decode("ascii")

    def ndarray(self, t: torch.Tensor | None):
        """inseq's ``ndarray_encode`` of a step tensor (inseq keeps step tensors in float32)."""
        if t is None:
            return None
        t = _canonical_nan(t.detach().cpu())
        array = t.to(torch.float32 if t.is_floating_point() else t.dtype).contiguous().numpy()
        if self.primitives:
            return array.tolist()
        compact = self.compact
        if isinstance(compact, int) and not isinstance(compact, bool):
            compact = array.size >= compact
        if compact:
            raw, header = array.tobytes(), "b64:"
            if not self.compression:  # arrays are gzipped only when the whole file is not
                small = _gzip(raw, 9)
                if len(small) < 0.9 * len(raw) and len(small) < len(raw) - 8:
                    raw, header = small, "b64.gz:"
            data = header + base64.standard_b64encode(raw).decode("ascii")
        else:
            data = array.tolist()
        out = {"__ndarray__": data, "dtype": str(array.dtype), "shape": list(array.shape)}
        if array.ndim > 1:
            out["Corder"] = True
        return out

    def sequence(self, seq) -> dict:
        scores = getattr(seq, "sequence_scores", None) or {}
        attrs = {
            "attr_pos_end": int(seq.attr_pos_end),
            "attr_pos_start": int(seq.attr_pos_start),
            "sequence_scores": {k: self.safetensor(v) for k, v in scores.items()},
            "source": [self.token(t) for t in seq.source],
            "source_attributions": self.safetensor(seq.source_attributions),
            "step_scores": {k: self.safetensor(v) for k, v in (seq.step_scores or {}).items()},
            "target": [self.token(t) for t in seq.target],
            "target_attributions": self.safetensor(seq.target_attributions),
        }
        return self.obj((_INSEQ_MODULE, _SEQUENCE_CLASSES.get(seq.granularity, _SEQUENCE_CLASSES["none"])), attrs)

    def step(self, step, granularity: str | None) -> dict:
        def rows(value):  # inseq's per-row token lists (prefix, source); None when this output has none
            return None if value is None else [[self.token(t) for t in row] for row in value]

        scores = getattr(step, "sequence_scores", None) or {}
        attrs = {
            "prefix": rows(getattr(step, "prefix", None)),
            "sequence_scores": {k: self.ndarray(v) for k, v in scores.items()},
            "source": rows(getattr(step, "source", None)),
            "source_attributions": self.ndarray(step.source_attributions),
            "step_scores": {k: self.ndarray(v) for k, v in (step.step_scores or {}).items()},
            "target": [[self.token(t)] if not isinstance(t, list) else [self.token(x) for x in t]
                       for t in step.target],
            "target_attributions": self.ndarray(step.target_attributions),
        }
        if granularity not in _STEP_CLASSES:
            granularity = _granularity_from_ndim(
                step.source_attributions if step.source_attributions is not None else step.target_attributions, 2)
        return self.obj((_INSEQ_MODULE, _STEP_CLASSES[granularity]), attrs)

    def value(self, value: Any, depth: int = 0) -> Any:
        """An ``info`` value as inseq's encoder writes it (tensors as arrays, tuples as lists)."""
        if isinstance(value, torch.Tensor):
            return self.ndarray(value)
        if isinstance(value, dict):
            return {str(k): self.value(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v, depth + 1) for v in value]
        if hasattr(value, "token") and hasattr(value, "id") and not isinstance(value, type):
            return self.token(value)
        if value is None or isinstance(value, str | int | float | bool):
            return value
        return str(value)


def _canonical_nan(t: torch.Tensor) -> torch.Tensor:
    """NaNs as the one NaN inseq's own tensors hold (a NaN read from a float16 file keeps other payload bits)."""
    return t.masked_fill(t.isnan(), float("nan")) if t.is_floating_point() else t


def _granularity_from_ndim(t: torch.Tensor | None, token_dims: int) -> str:
    """The granularity implied by a score tensor's trailing dimensions (for files that do not name it)."""
    if t is None:
        return "none"
    extra = t.ndim - token_dims
    return "coarse" if extra <= 0 else "granular" if extra == 1 else "multidimensional"


# =====================================================================================================
# Loading
# =====================================================================================================
def load_output(path, max_decompressed_bytes: int | None = None):
    """Read a file written by inseq-lightning's or inseq 0.7.1's ``save`` (plain or gzipped, any options)."""
    limit = MAX_DECOMPRESSED_BYTES if max_decompressed_bytes is None else max_decompressed_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise InvalidInputError(f"max_decompressed_bytes must be a positive number of bytes, not {limit!r}")
    raw = Path(path).read_bytes()  # a missing or unreadable file keeps its OSError
    reader = _Reader(str(path), limit)
    try:
        return reader.load(raw)
    except InvalidFileError:
        raise
    except MemoryError:
        raise
    except Exception as err:  # a safety net: whatever else a malformed file triggers is reported alike
        raise InvalidFileError(f"{path}: not a readable attribution file ({type(err).__name__}: {err})") from err


class _Reader:
    """One load: the file name for messages and what is left of the decompression budget."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit, self.left = name, limit, limit

    def fail(self, where: str, what: str):
        raise InvalidFileError(f"{self.name}: {where}: {what}" if where else f"{self.name}: {what}")

    # ---- bytes ------------------------------------------------------------------------------------
    def gunzip(self, data: bytes, where: str) -> bytearray:
        """Stream-decompress, stopping as soon as the output would pass the remaining budget."""
        out = bytearray()
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                while chunk := f.read(min(1 << 20, self.left + 1)):
                    self.left -= len(chunk)
                    if self.left < 0:
                        self.fail(where, f"gzip data expands past max_decompressed_bytes={self.limit} bytes "
                                         "(pass a larger max_decompressed_bytes to load() if the file is trusted)")
                    out += chunk
        except (OSError, EOFError, zlib.error) as err:
            self.fail(where, f"not valid gzip data ({err})")
        return out

    def b64(self, text: Any, where: str) -> bytes:
        if not isinstance(text, str):
            self.fail(where, f"expected a base64 string, got {_kind(text)}")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            self.fail(where, f"not valid base64 ({err})")

    def safetensor(self, blob: bytes, where: str) -> torch.Tensor:
        """The one tensor of a safetensors blob, its header checked against the bytes that follow it."""
        if len(blob) < 8:
            self.fail(where, f"safetensors data of {len(blob)} bytes is shorter than its 8-byte header size")
        size = int.from_bytes(blob[:8], "little")
        if size > len(blob) - 8:
            self.fail(where, f"safetensors header declares {size} bytes but only {len(blob) - 8} follow")
        try:
            header = json.loads(blob[8 : 8 + size].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            self.fail(where, f"safetensors header is not JSON ({err})")
        if not isinstance(header, dict):
            self.fail(where, f"safetensors header is {_kind(header)}, not an object")
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        if len(entries) != 1:
            self.fail(where, f"safetensors data holds {len(entries)} tensors; one was expected")
        (spec,) = entries.values()
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            self.fail(where, "safetensors tensor entry must have exactly dtype, shape and data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        if dtype is None:
            self.fail(where, f"unsupported safetensors dtype {spec['dtype']!r}")
        shape = self.shape(spec["shape"], where)
        offsets = spec["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            self.fail(where, f"invalid safetensors data_offsets {offsets!r}")
        data = memoryview(blob)[8 + size :]
        if offsets[1] > len(data):
            self.fail(where, f"safetensors data_offsets {offsets} reach past the {len(data)} bytes of data")
        return self.from_bytes(data[offsets[0] : offsets[1]], dtype, shape, where)

    def from_bytes(self, data, dtype: torch.dtype, shape: list[int], where: str) -> torch.Tensor:
        count = math.prod(shape)
        needed = count * dtype.itemsize
        if len(data) != needed:
            self.fail(where, f"declared shape {shape} of {_dtype_name(dtype)} needs {needed} bytes, "
                             f"but the data holds {len(data)}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)

    def shape(self, value: Any, where: str) -> list[int]:
        if not isinstance(value, list) or len(value) > _MAX_DEPTH or not all(_is_int(d) and d >= 0 for d in value):
            self.fail(where, f"shape must be a list of non-negative integers, got {_short(value)}")
        return value

    def nested_list(self, data: Any, where: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A rectangular nested list of numbers (NaN allowed) as a tensor."""
        if not isinstance(data, list):
            self.fail(where, f"expected a list of numbers, got {_kind(data)}")
        try:
            t = torch.tensor(data, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            self.fail(where, f"not a rectangular list of numbers ({str(err)[:200]})")
        return t.to(dtype)

    # ---- the file -------------------------------------------------------------------------------------
    def load(self, raw: bytes):
        if raw[:2] == b"\x1f\x8b":
            raw = self.gunzip(raw, "")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail("", "not UTF-8 JSON text (a binary file such as a pickle?)")
        try:
            payload = json.loads(text)
        except RecursionError:
            self.fail("", "JSON nested too deeply")
        except ValueError as err:
            self.fail("", f"not valid JSON ({err})")
        del text, raw
        if not isinstance(payload, dict):
            self.fail("", f"the file holds {_kind(payload)}, not an attribution output object")
        if "format" in payload or "version" in payload:
            return self.native(payload)
        if "__instance_type__" in payload:
            _, attrs = self.inseq_obj(payload, "", {_INSEQ_OUTPUT})
            return self.inseq(attrs)
        if "sequence_attributions" in payload:  # inseq's use_primitives layout
            return self.inseq(payload)
        self.fail("", "neither inseq-lightning's layout (a 'format' key) nor inseq's (an '__instance_type__' or "
                      "'sequence_attributions' key)")

    # ---- shared checks -----------------------------------------------------------------------------
    def fields_of(self, value: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {_kind(value)}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            self.fail(where, f"unexpected field(s) {', '.join(map(repr, unknown))} (expected some of "
                             f"{', '.join(sorted(allowed))}; written by a newer version?)")
        missing = sorted(required - set(value))
        if missing:
            self.fail(where, f"missing field(s) {', '.join(map(repr, missing))}")
        return value

    def position(self, value: Any, where: str, allow_none: bool = False) -> int | None:
        if value is None and allow_none:
            return None
        if not _is_int(value):
            self.fail(where, f"expected an integer position, got {_short(value)}")
        return value

    def scores_dict(self, value: Any, where: str, decode) -> dict[str, torch.Tensor]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(where, f"expected an object of named scores, got {_kind(value)}")
        return {name: decode(v, f"{where}[{name!r}]") for name, v in value.items()}

    def check_sequence(self, seq, where: str) -> None:
        """Sizes that agree with the tokens: ``[tokens, steps, ...]`` scores and one step score per step."""
        n_src, n_tgt = len(seq.source), len(seq.target)
        start, end = seq.attr_pos_start, seq.attr_pos_end
        if not 0 <= start <= end <= n_tgt:
            self.fail(where, f"attr_pos_start={start}, attr_pos_end={end} do not fit its {n_tgt} target tokens")
        steps = end - start
        for name, t, role in (("source_attributions", seq.source_attributions, "source"),
                              ("target_attributions", seq.target_attributions, "target")):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.ndim < 2:
                self.fail(f"{where}.{name}", f"shape {_shape(t)}; expected [tokens, steps, ...]")
            rows = t.shape[0]
            # target rows: every position up to attr_pos_end (inseq keeps one more on encoder-decoders)
            n_tokens = n_src if role == "source" else n_tgt
            if rows != n_src if role == "source" else not end <= rows <= n_tgt:
                self.fail(f"{where}.{name}", f"shape {_shape(t)} has {rows} token rows for {n_tokens} {role} tokens")
            if t.shape[1] != steps:
                self.fail(f"{where}.{name}", f"shape {_shape(t)} has {t.shape[1]} step columns for the {steps} "
                                             f"attributed steps (attr_pos_start={start}, attr_pos_end={end})")
        if seq.source_attributions is not None and seq.target_attributions is not None \
                and seq.source_attributions.shape[2:] != seq.target_attributions.shape[2:]:
            self.fail(where, f"source_attributions {_shape(seq.source_attributions)} and target_attributions "
                             f"{_shape(seq.target_attributions)} differ past their token and step dimensions")
        for name, score in (seq.step_scores or {}).items():
            if not isinstance(score, torch.Tensor) or score.ndim != 1 or score.shape[0] != steps:
                self.fail(f"{where}.step_scores[{name!r}]", f"shape {_shape(score)} holds "
                          f"{score.numel() if isinstance(score, torch.Tensor) else '?'} scores for {steps} steps")

    def check_step(self, step, where: str, **token_rows) -> None:
        """Every tensor holds one row per sequence of the step (one per generated token), and the ``prefix`` /
        ``source`` token rows (inseq's) are as long as the attributions' token dimension."""
        rows = len(step.target)
        tensors = [("source_attributions", step.source_attributions, 2), ("target_attributions",
                   step.target_attributions, 2), *((f"step_scores[{k!r}]", v, 1) for k, v in step.step_scores.items())]
        for name, t, min_dims in tensors:
            if t is None:
                continue
            if t.ndim < min_dims or (min_dims == 1 and t.ndim != 1) or t.shape[0] != rows:
                self.fail(f"{where}.{name}", f"shape {_shape(t)} does not hold one row for each of the {rows} "
                                             "sequences this step generated a token for")
        for label in ("prefix", "source"):
            value = token_rows.get(label)
            if value is not None and len(value) != rows:
                self.fail(f"{where}.{label}", f"{len(value)} token rows for the step's {rows} sequences")
        for label, t in (("source", step.source_attributions), ("prefix", step.target_attributions)):
            value = token_rows.get(label)
            if value is not None and t is not None and any(len(row) != t.shape[1] for row in value):
                self.fail(f"{where}.{label}", f"token rows of {sorted({len(r) for r in value})} tokens for "
                                              f"attributions of shape {_shape(t)}")

    # ---- inseq-lightning's layout ----------------------------------------------------------------------
    def native(self, payload: dict):
        from .outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, FeatureAttributionStepOutput

        if payload.get("format") != _NATIVE_FORMAT:
            self.fail("format", f"unknown format {_short(payload.get('format'))} (expected {_NATIVE_FORMAT!r})")
        version = payload.get("version")
        if not _is_int(version) or version != FORMAT_VERSION:
            self.fail("version", f"unsupported version {_short(version)}: this inseq-lightning reads version "
                                 f"{FORMAT_VERSION} (a newer inseq-lightning wrote the file?)")
        self.fields_of(payload, "", {"format", "version", "sequence_attributions", "step_attributions", "info"},
                       {"sequence_attributions"})
        sequences = payload["sequence_attributions"]
        if not isinstance(sequences, list):
            self.fail("sequence_attributions", f"expected a list, got {_kind(sequences)}")
        seq_fields = {f.name for f in dataclasses.fields(FeatureAttributionSequenceOutput)}
        out_sequences = []
        for i, raw in enumerate(sequences):
            where = f"sequence_attributions[{i}]"
            data = self.native_fields(raw, where, seq_fields, {"source", "target"})
            seq = self.build(FeatureAttributionSequenceOutput.from_dict, data, where)
            self.check_sequence(seq, where)
            out_sequences.append(seq)
        steps = payload.get("step_attributions")
        out_steps = None
        if steps is not None:
            if not isinstance(steps, list):
                self.fail("step_attributions", f"expected a list or null, got {_kind(steps)}")
            step_fields = {f.name for f in dataclasses.fields(FeatureAttributionStepOutput)}
            out_steps = []
            for k, raw in enumerate(steps):
                where = f"step_attributions[{k}]"
                data = self.native_fields(raw, where, step_fields, {"target"})
                step = self.build(FeatureAttributionStepOutput.from_dict, data, where)
                self.check_step(step, where)
                out_steps.append(step)
        info = self.native_value(payload.get("info", {}), "info")
        if not isinstance(info, dict):
            self.fail("info", f"expected an object, got {_kind(info)}")
        return FeatureAttributionOutput(out_sequences, out_steps, info)

    def native_fields(self, raw: Any, where: str, allowed: set[str], required: set[str]) -> dict:
        """A sequence or step dict with its known fields checked and its tensors decoded."""
        from .aggregation import DEFAULT_AGGREGATORS

        raw = self.fields_of(raw, where, allowed, required)
        data = {}
        for key, value in raw.items():
            at = f"{where}.{key}"
            if key in ("source", "target", "prefix"):
                data[key] = self.native_tokens(value, at)
            elif key in ("source_attributions", "target_attributions"):
                data[key] = None if value is None else self.native_tensor(value, at)
            elif key in ("step_scores", "sequence_scores"):
                data[key] = self.scores_dict(value, at, self.native_tensor)
            elif key in ("attr_pos_start", "attr_pos_end"):
                data[key] = self.position(value, at, allow_none=key == "attr_pos_end")
            elif key == "granularity":
                if not isinstance(value, str) or value not in DEFAULT_AGGREGATORS:
                    self.fail(at, f"unknown granularity {_short(value)} (expected one of "
                                  f"{', '.join(DEFAULT_AGGREGATORS)})")
                data[key] = value
            elif key == "aggregated":
                if not isinstance(value, bool):
                    self.fail(at, f"expected true or false, got {_short(value)}")
                data[key] = value
            else:  # a field added to the output classes later: decoded, not checked
                data[key] = self.native_value(value, at)
        return data

    def native_tokens(self, value: Any, where: str, rows: bool = True) -> list | None:
        """``[token, id]`` pairs, or (``rows``) lists of them, one per sequence (step outputs)."""
        if value is None and rows:
            return None
        if not isinstance(value, list):
            self.fail(where, f"expected a list of [token, id] pairs, got {_kind(value)}")
        for j, pair in enumerate(value):
            if rows and isinstance(pair, list) and all(isinstance(p, list) for p in pair):
                self.native_tokens(pair, f"{where}[{j}]", rows=False)
            elif not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and _is_int(pair[1])):
                self.fail(f"{where}[{j}]", f"expected a [token string, integer id] pair, got {_short(pair)}")
        return value

    def native_tensor(self, value: Any, where: str) -> torch.Tensor:
        if not isinstance(value, dict) or "__tensor__" not in value:
            self.fail(where, f"expected a tensor ({{\"__tensor__\": ...}}), got {_short(value)}")
        kind = value["__tensor__"]
        if kind == "safetensors":
            self.fields_of(value, where, {"__tensor__", "data"}, {"data"})
            t = self.safetensor(self.b64(value["data"], where), where)
        elif kind == "list":
            self.fields_of(value, where, {"__tensor__", "data", "shape"}, {"data", "shape"})
            shape = self.shape(value["shape"], where)
            t = self.nested_list(value["data"], where)
            t = self.match_shape(t, shape, where)
        else:
            self.fail(where, f"unknown tensor encoding {_short(kind)} (expected 'safetensors' or 'list')")
        return t.to(torch.float32) if t.is_floating_point() else t

    def native_value(self, value: Any, where: str, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            self.fail(where, f"nested deeper than {_MAX_DEPTH} levels")
        if isinstance(value, dict):
            if "__tensor__" in value:
                return self.native_tensor(value, where)
            if "__nan__" in value:
                if value != {"__nan__": True}:
                    self.fail(where, f"malformed NaN marker {_short(value)}")
                return float("nan")
            return {k: self.native_value(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.native_value(v, f"{where}[{j}]", depth + 1) for j, v in enumerate(value)]
        return value

    def build(self, factory, data: dict, where: str):
        try:
            return factory(data)
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            self.fail(where, f"cannot be built from its fields ({type(err).__name__}: {err})")

    def match_shape(self, t: torch.Tensor, shape: list[int], where: str) -> torch.Tensor:
        if list(t.shape) != shape:
            if t.numel() == 0 and math.prod(shape) == 0:
                return t.reshape(shape)
            self.fail(where, f"data of shape {_shape(t)} does not match its declared shape {shape}")
        return t

    # ---- inseq 0.7.1's layout -----------------------------------------------------------------------------
    def inseq_obj(self, value: Any, where: str, kinds: set[tuple[str, str]]) -> tuple[str | None, dict]:
        """(class name, attributes) of an encoded object; a bare dict (``use_primitives``) has no class name."""
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {_kind(value)}")
        if "__instance_type__" not in value:
            return None, value
        kind = value["__instance_type__"]
        if not (isinstance(kind, list) and len(kind) == 2 and all(isinstance(k, str) for k in kind)) \
                or tuple(kind) not in kinds:
            expected = ", ".join(sorted(".".join(k) for k in kinds))
            self.fail(where, f"unsupported object type {_short(kind)} (expected {expected}); nothing is imported "
                             "from a file")
        self.fields_of(value, where, {"__instance_type__", "attributes"})
        attrs = value.get("attributes", {})
        if not isinstance(attrs, dict):
            self.fail(f"{where}.attributes", f"expected an object, got {_kind(attrs)}")
        return kind[1], attrs

    def inseq(self, attrs: dict):
        from .outputs import FeatureAttributionOutput

        self.fields_of(attrs, "", {"info", "sequence_attributions", "step_attributions"}, {"sequence_attributions"})
        info = attrs.get("info")
        info = {} if info is None else self.inseq_value(info, "info")
        if not isinstance(info, dict):
            self.fail("info", f"expected an object, got {_kind(info)}")
        sequences = attrs["sequence_attributions"]
        if not isinstance(sequences, list):
            self.fail("sequence_attributions", f"expected a list, got {_kind(sequences)}")
        out_sequences = [self.inseq_sequence(s, f"sequence_attributions[{i}]", info) for i, s in enumerate(sequences)]
        steps = attrs.get("step_attributions")
        out_steps = None
        if steps is not None:
            if not isinstance(steps, list):
                self.fail("step_attributions", f"expected a list or null, got {_kind(steps)}")
            out_steps = [self.inseq_step(s, f"step_attributions[{k}]", info) for k, s in enumerate(steps)]
        return FeatureAttributionOutput(out_sequences, out_steps, info)

    def inseq_sequence(self, value: Any, where: str, info: dict):
        from .outputs import FeatureAttributionSequenceOutput

        kinds = {(_INSEQ_MODULE, name) for name in _SEQUENCE_CLASSES.values()}
        name, attrs = self.inseq_obj(value, where, kinds)
        self.fields_of(attrs, where, _INSEQ_SEQUENCE_FIELDS, {"source", "target"})
        data = {
            "source": self.inseq_tokens(attrs["source"], f"{where}.source"),
            "target": self.inseq_tokens(attrs["target"], f"{where}.target"),
            "source_attributions": self.inseq_safetensor(attrs.get("source_attributions"),
                                                         f"{where}.source_attributions"),
            "target_attributions": self.inseq_safetensor(attrs.get("target_attributions"),
                                                         f"{where}.target_attributions"),
            "step_scores": self.scores_dict(attrs.get("step_scores"), f"{where}.step_scores", self.inseq_safetensor),
            "attr_pos_start": self.position(attrs.get("attr_pos_start", 0), f"{where}.attr_pos_start"),
            "attr_pos_end": self.position(attrs.get("attr_pos_end"), f"{where}.attr_pos_end", allow_none=True),
        }
        if data["attr_pos_end"] is not None and data["attr_pos_end"] > len(data["target"]):
            data["attr_pos_end"] = len(data["target"])  # inseq clamps it on load
        scores = self.scores_dict(attrs.get("sequence_scores"), f"{where}.sequence_scores", self.inseq_safetensor)
        self.sequence_scores(FeatureAttributionSequenceOutput, data, scores, where)
        attributions = data["source_attributions"] if data["source_attributions"] is not None \
            else data["target_attributions"]
        granularity = _GRANULARITY_OF[name] if name else _method_granularity(info, attributions)
        data["granularity"] = granularity
        # inseq keeps the class of an aggregated output: one score per (token, step) means nothing left to reduce
        data["aggregated"] = attributions is not None and attributions.ndim == 2 and granularity != "coarse"
        seq = FeatureAttributionSequenceOutput(**data)
        self.check_sequence(seq, where)
        return seq

    def inseq_step(self, value: Any, where: str, info: dict):
        from .outputs import FeatureAttributionStepOutput

        kinds = {(_INSEQ_MODULE, name) for name in _STEP_CLASSES.values()}
        _, attrs = self.inseq_obj(value, where, kinds)
        self.fields_of(attrs, where, _INSEQ_STEP_FIELDS, {"target"})
        target = attrs["target"]
        if not isinstance(target, list):
            self.fail(f"{where}.target", f"expected a list of token rows, got {_kind(target)}")
        tokens = []
        for j, row in enumerate(target):
            row = self.inseq_tokens(row, f"{where}.target[{j}]")
            if len(row) != 1:
                self.fail(f"{where}.target[{j}]", f"{len(row)} tokens; a step generates one token per sequence")
            tokens.append(row[0])
        data = {
            "source_attributions": self.inseq_array(attrs.get("source_attributions"), f"{where}.source_attributions"),
            "target_attributions": self.inseq_array(attrs.get("target_attributions"), f"{where}.target_attributions"),
            "step_scores": self.scores_dict(attrs.get("step_scores"), f"{where}.step_scores", self.inseq_array),
            "target": tokens,
        }
        fields = {f.name for f in dataclasses.fields(FeatureAttributionStepOutput)}
        extra = {}
        for label in ("prefix", "source"):
            rows = attrs.get(label)
            if rows is None:
                continue
            if not isinstance(rows, list):
                self.fail(f"{where}.{label}", f"expected a list of token rows, got {_kind(rows)}")
            extra[label] = [self.inseq_tokens(r, f"{where}.{label}[{j}]") for j, r in enumerate(rows)]
        scores = self.scores_dict(attrs.get("sequence_scores"), f"{where}.sequence_scores", self.inseq_array)
        self.sequence_scores(FeatureAttributionStepOutput, data, scores, where)
        step = FeatureAttributionStepOutput(**data, **{k: v for k, v in extra.items() if k in fields})
        self.check_step(step, where, **extra)  # prefix and source are checked even where the class drops them
        return step

    def sequence_scores(self, cls, data: dict, scores: dict, where: str) -> None:
        if "sequence_scores" in {f.name for f in dataclasses.fields(cls)}:
            data["sequence_scores"] = scores
        elif scores:
            warnings.warn(f"{self.name}: {where}.sequence_scores ({', '.join(scores)}) dropped: this output class "
                          "has no sequence_scores", UserWarning, stacklevel=2)

    def inseq_tokens(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, f"expected a list of tokens, got {_kind(value)}")
        return [self.inseq_token(item, f"{where}[{j}]") for j, item in enumerate(value)]

    def inseq_token(self, value: Any, where: str):
        from .outputs import TokenWithId

        _, attrs = self.inseq_obj(value, where, {_INSEQ_TOKEN})
        self.fields_of(attrs, where, {"id", "token"}, {"id", "token"})
        if not isinstance(attrs["token"], str) or not _is_int(attrs["id"]):
            self.fail(where, f"expected a token string and an integer id, got {_short(attrs)}")
        return TokenWithId(attrs["token"], attrs["id"])

    def inseq_safetensor(self, value: Any, where: str) -> torch.Tensor | None:
        """A sequence tensor: inseq writes base64 safetensors there whatever the other options."""
        if value is None:
            return None
        t = self.safetensor(self.b64(value, where), where)
        return t.to(torch.float32)

    def inseq_array(self, value: Any, where: str) -> torch.Tensor | None:
        """A step tensor: an ``__ndarray__`` object, or a bare nested list (``use_primitives``)."""
        if value is None:
            return None
        if isinstance(value, list):
            return self.nested_list(value, where)
        if not isinstance(value, dict) or "__ndarray__" not in value:
            self.fail(where, f"expected an array ({{\"__ndarray__\": ...}}) or a list, got {_short(value)}")
        self.fields_of(value, where, {"__ndarray__", "dtype", "shape", "Corder"}, {"dtype", "shape"})
        dtype = _NUMPY_DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
        if dtype is None:
            self.fail(where, f"unsupported array dtype {_short(value['dtype'])} (expected one of "
                             f"{', '.join(_NUMPY_DTYPES)})")
        shape = self.shape(value["shape"], where)
        order = value.get("Corder", True)
        if not isinstance(order, bool):
            self.fail(where, f"Corder must be true or false, got {_short(order)}")
        data = value["__ndarray__"]
        if isinstance(data, str):
            if not order and len(shape) > 1:
                self.fail(where, "Fortran-ordered binary arrays are not supported (inseq writes C order)")
            if data.startswith("b64.gz:"):
                raw = self.gunzip(self.b64(data[7:], where), where)
            elif data.startswith("b64:"):
                raw = self.b64(data[4:], where)
            else:
                self.fail(where, "array data must start with 'b64:' or 'b64.gz:'")
            t = self.from_bytes(raw, dtype, shape, where)
        elif not shape and _is_number(data):
            t = torch.tensor(data, dtype=dtype)
        else:
            t = self.match_shape(self.nested_list(data, where, dtype), shape, where)
        return t.to(torch.float32) if t.is_floating_point() else t

    def inseq_value(self, value: Any, where: str, depth: int = 0) -> Any:
        """An ``info`` value: JSON as is, arrays as tensors, tokens as tokens; any other object is refused."""
        if depth > _MAX_DEPTH:
            self.fail(where, f"nested deeper than {_MAX_DEPTH} levels")
        if isinstance(value, dict):
            if "__ndarray__" in value:
                return self.inseq_array(value, where)
            if "__instance_type__" in value:
                return self.inseq_token(value, where)
            return {k: self.inseq_value(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.inseq_value(v, f"{where}[{j}]", depth + 1) for j, v in enumerate(value)]
        return value


def _method_granularity(info: dict, attributions: torch.Tensor | None) -> str:
    """The granularity of a file that does not name its class (``use_primitives``): the method's when it is
    registered here, else the one its scores' dimensions imply."""
    method = info.get("attribution_method")
    try:
        from ..attr.methods import base
    except ImportError:  # the registry is only a hint: a file loads without it
        base = None
    if base is not None and isinstance(method, str) and method in base.METHODS.names():
        return base.METHODS.get(method).granularity
    return _granularity_from_ndim(attributions, 2)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else _kind(t)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
