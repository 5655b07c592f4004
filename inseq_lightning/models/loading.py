"""load_model: wrap a loaded Hugging Face model, or load one from a local directory (never the hub)."""

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


def load_model(
    model: str | Path | PreTrainedModel,
    attribution_method: str | None = None,
    framework: str = "hf_transformers",
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    device: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    **kwargs,
) -> AttributionModel:
    """Wrap ``model`` for attribution.

    Args:
        model: a loaded ``PreTrainedModel`` (pass ``tokenizer=``) or a local directory saved with
            ``save_pretrained``. Nothing is downloaded: a name that is not a local directory is an error.
        attribution_method: default method for :meth:`AttributionModel.attribute`.
        framework: only ``"hf_transformers"``.
        tokenizer: a tokenizer object or local directory (default: the model directory).
        device: move the model there (default: leave it where it is).

    Example:
        >>> import inseq_lightning
        >>> model = inseq_lightning.load_model(my_gpt2, "saliency", tokenizer=my_tokenizer)  # doctest: +SKIP
        >>> out = model.attribute("The cat", "The cat sat on the mat")  # doctest: +SKIP
    """
    if framework not in SUPPORTED_FRAMEWORKS:
        raise ModelLoadingError(f"Unknown framework {framework!r}; supported: {', '.join(SUPPORTED_FRAMEWORKS)}")
    if kwargs:
        raise ModelLoadingError(f"Unknown load_model argument(s): {', '.join(sorted(kwargs))}")
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise ModelLoadingError("A loaded model needs its tokenizer: load_model(model, tokenizer=tokenizer)")
        hf_model = model
    else:
        path = Path(model)
        if not path.is_dir():
            raise ModelLoadingError(
                f"{str(model)!r} is not a local directory. inseq-lightning never downloads from the Hugging Face "
                "hub: save the model with save_pretrained(dir) and pass dir, or pass a loaded PreTrainedModel."
            )
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            hf_model = auto.from_pretrained(path, local_files_only=True, **(model_kwargs or {}))
        except (OSError, ValueError) as error:
            raise ModelLoadingError(f"Could not load a model from {path}: {error}") from error
        if tokenizer is None:
            tokenizer = path
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tok_path = Path(tokenizer)
        if not tok_path.is_dir():
            raise ModelLoadingError(f"Tokenizer {str(tokenizer)!r} is not a local directory or a tokenizer object")
        tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True, **(tokenizer_kwargs or {}))
    if device is not None:
        hf_model.to(device)
    return AttributionModel(hf_model, tokenizer, attribution_method)
