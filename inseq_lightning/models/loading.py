"""load_model: wrap a loaded Hugging Face model, or load one (full or PEFT adapter) from a local directory."""

import json
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import ModelLoadingError
from .attribution_model import AttributionModel

SUPPORTED_FRAMEWORKS = ("hf_transformers",)
ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def load_model(
    model: str | Path | PreTrainedModel,
    attribution_method: str | None = None,
    framework: str = "hf_transformers",
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    device: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    base_model: str | Path | None = None,
    **kwargs,
) -> AttributionModel:
    """Wrap ``model`` for attribution.

    Args:
        model: a loaded ``PreTrainedModel`` or PEFT ``PeftModel`` (pass ``tokenizer=``), or a local
            directory: a full model saved with ``save_pretrained``, or a PEFT adapter checkpoint
            (``adapter_config.json`` + adapter weights, e.g. a LoRA run's ``checkpoint-<N>``). Adapters
            are attributed switched on: the base model with the adapter layers injected, as the
            training callbacks attribute a ``PeftModel`` (same numbers as the merged model). Nothing is
            downloaded: a name that is not a local directory is an error.
        attribution_method: default method for :meth:`AttributionModel.attribute`.
        framework: only ``"hf_transformers"``.
        tokenizer: a tokenizer object or local directory (default: the model directory; for an
            adapter checkpoint without a tokenizer, the base model's directory).
        device: move the model there (default: leave it where it is).
        model_kwargs: ``from_pretrained`` arguments of the (base) model.
        base_model: local directory of an adapter checkpoint's base model (default: the
            ``base_model_name_or_path`` of its ``adapter_config.json``). Needs ``pip install inseq-lightning[peft]``.

    Example:
        >>> import inseq_lightning
        >>> model = inseq_lightning.load_model(my_gpt2, "saliency", tokenizer=my_tokenizer)  # doctest: +SKIP
        >>> lora = inseq_lightning.load_model("run/checkpoint-500", base_model="models/base")  # doctest: +SKIP
        >>> out = model.attribute("The cat", "The cat sat on the mat")  # doctest: +SKIP
    """
    if framework not in SUPPORTED_FRAMEWORKS:
        raise ModelLoadingError(f"Unknown framework {framework!r}; supported: {', '.join(SUPPORTED_FRAMEWORKS)}")
    if kwargs:
        raise ModelLoadingError(f"Unknown load_model argument(s): {', '.join(sorted(kwargs))}")
    if isinstance(model, str | Path) and is_adapter_checkpoint(model):
        base_dir = adapter_base_model(model, base_model)
        hf_model = AdapterSwitcher(base_dir, model_kwargs).load(model)
        tokenizer = tokenizer if tokenizer is not None else tokenizer_dir(model, base_dir)
    elif base_model is not None:
        raise ModelLoadingError(f"base_model= applies to PEFT adapter checkpoints (a directory with {ADAPTER_CONFIG}); "
                                f"{model!r} is not one: drop base_model=")
    elif isinstance(model, str | Path):
        hf_model = load_hf_model(model, model_kwargs)
        tokenizer = tokenizer if tokenizer is not None else model
    else:
        if tokenizer is None:
            raise ModelLoadingError("A loaded model needs its tokenizer: load_model(model, tokenizer=tokenizer)")
        hf_model = model if isinstance(model, PreTrainedModel) else _unwrap_peft(model)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = load_tokenizer(tokenizer, tokenizer_kwargs)
    if device is not None:
        hf_model.to(device)
    return AttributionModel(hf_model, tokenizer, attribution_method)


def load_hf_model(path: str | Path, model_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """A full model from a local ``save_pretrained`` directory (seq2seq or causal LM, read from its config)."""
    path = _local_dir(path, "model")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        return auto.from_pretrained(path, local_files_only=True, **(model_kwargs or {}))
    except (OSError, ValueError) as error:
        raise ModelLoadingError(f"Could not load a model from {path}: {error}") from error


def load_tokenizer(path: str | Path, tokenizer_kwargs: dict[str, Any] | None = None) -> PreTrainedTokenizerBase:
    tok_path = Path(path)
    if not tok_path.is_dir():
        raise ModelLoadingError(f"Tokenizer {str(path)!r} is not a local directory or a tokenizer object")
    return AutoTokenizer.from_pretrained(tok_path, local_files_only=True, **(tokenizer_kwargs or {}))


def _local_dir(path: str | Path, what: str) -> Path:
    if not Path(path).is_dir():
        raise ModelLoadingError(
            f"{what} {str(path)!r} is not a local directory. inseq-lightning never downloads from the Hugging Face "
            "hub: save the model with save_pretrained(dir) and pass dir, or pass a loaded PreTrainedModel."
        )
    return Path(path)


# ---- PEFT adapter checkpoints -----------------------------------------------------------------
def is_adapter_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter checkpoint (``adapter_config.json``, adapter weights only)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_model(adapter_dir: str | Path, base_model: str | Path | None = None) -> Path:
    """The local base model directory of an adapter checkpoint: ``base_model``, else its config's."""
    if base_model is None:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_model = config.get("base_model_name_or_path")
        if not base_model:
            raise ModelLoadingError(f"{Path(adapter_dir) / ADAPTER_CONFIG} names no base model "
                                    "(base_model_name_or_path): pass base_model= (CLI: --base-model) with the "
                                    "base model's local directory")
    if not Path(base_model).is_dir():
        raise ModelLoadingError(f"The base model {str(base_model)!r} of adapter checkpoint {str(adapter_dir)!r} is not "
                                "a local directory, and inseq-lightning never downloads from the Hugging Face hub: "
                                "pass base_model= (CLI: --base-model) with the base model saved by save_pretrained")
    return Path(base_model)


def tokenizer_dir(adapter_dir: str | Path, base_dir: Path) -> Path:
    """The adapter checkpoint's own tokenizer when it saved one (the Trainer does), else the base model's."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir if any((adapter_dir / name).is_file() for name in _TOKENIZER_FILES) else base_dir


def import_peft():
    try:
        import peft
    except ImportError as error:
        raise ModelLoadingError("PEFT adapter checkpoints need the peft package: "
                                "pip install 'inseq-lightning[peft]'") from error
    return peft


def _unwrap_peft(model) -> PreTrainedModel:
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    if not isinstance(base, PreTrainedModel):
        raise ModelLoadingError(f"Cannot attribute a {type(model).__name__}: pass a PreTrainedModel, a PEFT "
                                "PeftModel, or a local model or adapter directory")
    return base


class AdapterSwitcher:
    """One base model in memory; PEFT adapter checkpoints are loaded into it one at a time.

    :meth:`load` returns the base model with that checkpoint's adapter injected and active (what
    ``PeftModel.get_base_model()`` gives and the training callbacks attribute) and drops the
    previous adapter, so a run over N checkpoints loads the base weights once, not N times.
    """

    def __init__(self, base_dir: str | Path, model_kwargs: dict[str, Any] | None = None):
        self._peft = import_peft()  # before the base model's weights: fail fast without peft
        self.base = load_hf_model(base_dir, model_kwargs)
        self._peft_model = None
        self._loaded = 0

    def load(self, adapter_dir: str | Path) -> PreTrainedModel:
        name, previous = f"adapter_{self._loaded}", f"adapter_{self._loaded - 1}"
        try:
            if self._peft_model is None:
                self._peft_model = self._peft.PeftModel.from_pretrained(self.base, adapter_dir, adapter_name=name)
            else:
                self._peft_model.load_adapter(adapter_dir, adapter_name=name)
                self._peft_model.set_adapter(name)
                self._peft_model.delete_adapter(previous)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadingError(f"Could not load the PEFT adapter in {adapter_dir}: {error}") from error
        self._loaded += 1
        return self._peft_model.get_base_model()
