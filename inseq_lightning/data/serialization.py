"""JSON (optionally gzipped) save/load of attribution outputs; tensors travel as base64 safetensors.

Loading only parses JSON and safetensors: nothing is ever unpickled.
"""

import base64
import gzip
import json
import math
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

FORMAT_VERSION = 1
_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "float8": torch.float8_e4m3fn}


def _encode_tensor(t: torch.Tensor, precision: str, use_primitives: bool) -> dict[str, Any]:
    if use_primitives:
        return {"__tensor__": "list", "data": torch.nan_to_num(t.float(), nan=float("nan")).tolist(),
                "shape": list(t.shape)}
    dtype = _PRECISIONS[precision] if t.is_floating_point() else t.dtype
    blob = safetensors.torch.save({"t": t.detach().cpu().to(dtype).contiguous()})
    return {"__tensor__": "safetensors", "data": base64.b64encode(blob).decode("ascii")}


def _decode_tensor(obj: dict[str, Any]) -> torch.Tensor:
    if obj["__tensor__"] == "list":
        return torch.tensor(obj["data"], dtype=torch.float32).reshape(obj["shape"])
    if obj["__tensor__"] != "safetensors":
        raise ValueError(f"Unknown tensor encoding {obj['__tensor__']!r}")
    t = safetensors.torch.load(base64.b64decode(obj["data"]))["t"]
    return t.to(torch.float32) if t.is_floating_point() else t


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


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return _decode_tensor(value)
        if value.get("__nan__"):
            return float("nan")
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _write(path: Path, payload: dict, compress: bool, compact: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=None if compact else 2, allow_nan=True)
    if compress:
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")


def save_output(output, path, overwrite=False, compress=False, ndarray_compact=True, use_primitives=False,
                split_sequences=False, scores_precision="float32") -> None:
    if scores_precision not in _PRECISIONS:
        raise ValueError(f"scores_precision must be one of {', '.join(_PRECISIONS)}, not {scores_precision!r}")
    path = Path(path)
    groups = [[s] for s in output.sequence_attributions] if split_sequences else [output.sequence_attributions]
    for i, sequences in enumerate(groups):
        payload = {
            "format": "inseq_lightning.FeatureAttributionOutput",
            "version": FORMAT_VERSION,
            "sequence_attributions": [_to_json(s.to_dict(), scores_precision, use_primitives) for s in sequences],
            "step_attributions": _step_payload(output, sequences, split_sequences, i, scores_precision, use_primitives),
            "info": _to_json(output.info, scores_precision, use_primitives),
        }
        target = path if not split_sequences else path.with_name(f"{path.stem}_{i}{path.suffix}")
        _write(target, payload, compress, ndarray_compact, overwrite)


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


def load_output(path):
    from .outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, FeatureAttributionStepOutput

    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    payload = json.loads(raw.decode("utf-8"))
    if payload.get("format") != "inseq_lightning.FeatureAttributionOutput":
        raise ValueError(f"{path} is not an inseq-lightning attribution file")
    sequences = [FeatureAttributionSequenceOutput.from_dict(_from_json(s)) for s in payload["sequence_attributions"]]
    steps = payload.get("step_attributions")
    steps = [FeatureAttributionStepOutput.from_dict(_from_json(step)) for step in steps] if steps is not None else None
    return FeatureAttributionOutput(sequences, steps, _from_json(payload["info"]))
