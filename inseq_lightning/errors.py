"""Typed errors raised by inseq-lightning; each message says what to do instead."""


class InseqLightningError(Exception):
    """Base class of every error raised on purpose by this package."""


class UnknownMethodError(InseqLightningError, ValueError):
    """An attribution method name that is not registered."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(
            f"Unknown attribution method {name!r}. Choose one of: {', '.join(sorted(available))}."
        )


class UnknownStepFunctionError(InseqLightningError, ValueError):
    """A step function name that is not registered."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(
            f"Unknown step function {name!r}. Choose one of: {', '.join(sorted(available))}, "
            "or register your own with inseq_lightning.register_step_function."
        )


class InvalidInputError(InseqLightningError, ValueError):
    """Texts, targets or options that cannot be attributed as given."""


class ModelLoadingError(InseqLightningError, ValueError):
    """A model or tokenizer that cannot be loaded locally."""


class TokenizerError(InseqLightningError, ValueError):
    """A tokenizer that lacks something attribution needs (pad, unk or eos tokens)."""


class TokenBoundaryWarning(UserWarning):
    """A prompt ends inside a token of its full text: that token is attributed as the first target token."""


class InvalidFileError(InvalidInputError):
    """An attribution file that cannot be loaded: not JSON, an unknown layout or version, wrong types, shapes that
    do not match its tokens, sizes beyond its data, or compressed data that expands past the loading limit.

    Every problem found while loading a file raises this one error; its message names the file, the place in
    it and what is wrong."""
