"""Shared fixtures: tiny models built locally once per test session (nothing is downloaded)."""

import copy
import warnings

import pytest
import transformers

import inseq_lightning as il
from inseq_lightning.tiny_models import TINY_MODELS

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=UserWarning)

# (prompt/source, forced target) per family; decoder-only targets start with their prompt.
TEXTS = {
    "gpt2": ("Hello world", "Hello world, this is a cat"),
    "llama": ("The cat sat", "The cat sat on the mat"),
    "marian": ("Hello world", "Le chat est noir"),
}


@pytest.fixture(scope="session", params=list(TINY_MODELS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def hf_models():
    return {name: build() for name, build in TINY_MODELS.items()}


@pytest.fixture()
def hf_pair(hf_models, family):
    """A fresh copy of the family's (model, tokenizer) so tests cannot leak state into each other."""
    model, tok = hf_models[family]
    return copy.deepcopy(model), copy.deepcopy(tok)


@pytest.fixture()
def texts(family):
    return TEXTS[family]


@pytest.fixture()
def attribution_model(hf_pair):
    model, tok = hf_pair
    return il.load_model(model, "saliency", tokenizer=tok)


@pytest.fixture()
def wandb_offline(tmp_path, monkeypatch):
    """A W&B offline session writing under ``tmp_path/wandb`` (read back with tests/wandb_reader.py)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "tests")
    wandb.teardown()  # wandb reads its settings (WANDB_DIR) once per process: start a fresh session
    yield tmp_path
    wandb.finish()
