"""Tiny, locally built models and tokenizers for tests, examples and benchmarks (nothing is downloaded).

Three families cover the position schemes and embedding conventions attribution must handle:
GPT-2 (absolute positions, no BOS added, EOS doubles as BOS/UNK), Llama (rotary positions, BOS
added, UNK token) and Marian (encoder-decoder, ``embed_scale = sqrt(d_model)`` applied outside the
embedding layer, decoder start = PAD).

Three tokenizer families cover how text and tokens map to each other: byte-level BPE (GPT-2:
``Ġ`` marks a space, multi-byte characters span tokens), SentencePiece-style Metaspace (Llama-2,
Mistral: ``▁`` marks a space and decoding drops the first one) and WordPiece (BERT: ``##`` marks a
word's continuation, decoding re-spaces punctuation). Any of them can drive :func:`tiny_llama`.
"""

from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The cat sat on the mat and looked at the dog.",
    "Paris is the capital of France. Rome is the capital of Italy.",
    "Question: where is the key? Context: the key is under the red box.",
    "Answer: the key is in the kitchen drawer next to the spoons.",
    "Attribution shows which input tokens a prediction relies on.",
    "Models learn to predict the next token from the previous ones.",
    "Alice gave Bob a book, and Bob thanked Alice for the gift.",
    "one two three four five six seven eight nine ten eleven twelve",
    "I like green apples, red cherries and yellow bananas.",
    "Das ist ein kleines Haus. Le chat est noir. Il gatto dorme.",
] * 4


def _train(special: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@cache
def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    tok = _train(["<|endoftext|>"], 400)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


@cache
def llama_tokenizer() -> PreTrainedTokenizerFast:
    tok = _train(["<unk>", "<s>", "</s>"], 400)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@cache
def marian_tokenizer() -> PreTrainedTokenizerFast:
    tok = _train(["</s>", "<unk>", "<pad>"], 400)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@cache
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE as Llama-2 and Mistral ship it: ``▁`` for spaces, a space prepended to the
    first word only, BOS added; ``decode`` drops the first token's leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@cache
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-style WordPiece (``##`` continuations, punctuation split off); no special tokens added."""
    # The vocabulary is the Metaspace one rewritten: WordPiece's trainer (and BPE's with "##") break
    # ties differently from one process to the next, and tests need the same tokens every run.
    pieces = [t for t in metaspace_tokenizer().get_vocab() if t not in ("<unk>", "<s>", "</s>")]
    words = {t[1:] for t in pieces if t.startswith("▁") and len(t) > 1}
    continuations = {"##" + t for t in pieces if not t.startswith("▁")}
    characters = {c for t in pieces for c in t.lstrip("▁")}
    vocab = ["[UNK]", "[PAD]", "[SEP]", *sorted(words | characters | continuations | {"##" + c for c in characters})]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]")


# SmolLM2-Instruct's template (ChatML): what a chat-tuned model's tokenizer renders conversations with.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@cache
def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML's special tokens and chat template, as chat-tuned models ship them."""
    tok = _train(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 400)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


TOKENIZERS = {"byte_level": gpt2_tokenizer, "metaspace": metaspace_tokenizer, "wordpiece": wordpiece_tokenizer}


def tiny_gpt2(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, seed: int = 0,
              tokenizer: PreTrainedTokenizerFast | None = None, n_positions: int = 128, **config) -> tuple:
    tok = tokenizer or gpt2_tokenizer()
    torch.manual_seed(seed)
    config = {"vocab_size": len(tok), **config}  # a larger vocab_size gives a realistic output layer
    cfg = GPT2Config(n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **config)
    return GPT2LMHeadModel(cfg).eval(), tok


def tiny_llama(seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, **config) -> tuple:
    tok = tokenizer or llama_tokenizer()
    torch.manual_seed(seed)
    config = {"num_hidden_layers": 2, "max_position_embeddings": 128, **config}  # overridable, like the other sizes
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **config)
    return LlamaForCausalLM(cfg).eval(), tok


def tiny_marian(seed: int = 0, **config) -> tuple:
    tok = marian_tokenizer()
    torch.manual_seed(seed)
    cfg = MarianConfig(vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       decoder_start_token_id=tok.pad_token_id, scale_embedding=True, **config)
    return MarianMTModel(cfg).eval(), tok


TINY_MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "marian": tiny_marian}
