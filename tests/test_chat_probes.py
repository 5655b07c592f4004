"""Probes written as conversations: rendered with the tokenizer's own chat template, and only the
assistant's content tokens attributed. Expected tokens come from the rendered text's character offsets."""

import copy
import json

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from inseq_lightning.callbacks import AttributionMonitor
from inseq_lightning.demo.module import PairsLM
from inseq_lightning.errors import InvalidInputError, TokenizerError
from inseq_lightning.monitor import Probe, ProbeMonitor, ProbeSet
from inseq_lightning.tiny_models import chat_tokenizer, tiny_llama

FACTS = "Facts: Mia keeps a red kite. Leo keeps a blue boat. What does Leo keep?"
CONVERSATION = [{"role": "system", "content": "Answer from the facts."}, {"role": "user", "content": FACTS},
                {"role": "assistant", "content": "a blue boat."}]


@pytest.fixture(scope="module")
def chat_model():
    return tiny_llama(tokenizer=chat_tokenizer())


def _answer_token_ids(tok, messages, answer: str) -> list[int]:
    """The ids of the tokens holding the answer's characters in the template's rendering (independent of the library)."""
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    prompt = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    start, end = len(prompt), len(prompt) + len(answer)
    assert full[start:end] == answer
    encoding = tok(full, return_offsets_mapping=True)
    return [i for i, (s, e) in zip(encoding["input_ids"], encoding["offset_mapping"]) if s < end and e > start]


def test_only_the_assistants_content_tokens_are_attributed(chat_model):
    model, tok = chat_model
    probe = Probe(CONVERSATION, evidence=("Leo keeps a blue boat.",), name="leo")
    result = ProbeMonitor([probe], step_scores=("probability",)).run(model, tok, 0).results[0]
    generated = [t.id for t in result.output[0].generated]
    assert generated == _answer_token_ids(tok, CONVERSATION[:2], "a blue boat.")
    assert tok.convert_tokens_to_ids("<|im_end|>") not in generated
    assert 0 < result.evidence_mass < 1 and result.evidence_rows
    assert "Leo keeps a blue boat." in tok.decode([result.output[0].source[i].id for i in result.evidence_rows])
    assert set(result.message_mass) == {"0_system", "1_user"}
    assert sum(result.message_mass.values()) <= 1 + 1e-6 and result.message_mass["1_user"] > 0
    scalars = result.scalars()
    assert scalars["message_mass/1_user"] == result.message_mass["1_user"]


def test_template_tokens_are_steps_on_request(chat_model):
    model, tok = chat_model
    probes = ProbeSet([Probe(CONVERSATION)], include_template_tokens=True)
    generated = [t.token for t in ProbeMonitor(probes).run(model, tok, 0).results[0].output[0].generated]
    assert generated[-2:] == ["<|im_end|>", "Ċ"]


def test_trl_dataset_formats_and_jsonl_files_give_the_same_probe(tmp_path):
    messages = {"messages": CONVERSATION, "name": "a"}
    conversational = {"prompt": CONVERSATION[:2], "completion": [CONVERSATION[2]], "name": "a"}
    with_target = {"prompt": CONVERSATION[:2], "target": "a blue boat.", "name": "a"}
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps(messages) + "\n")
    sets = [ProbeSet.from_records([r]) for r in (messages, conversational, with_target)] + [ProbeSet.from_file(path)]
    probes = [s[0] for s in sets]
    assert all(p.is_chat and p.messages == tuple(CONVERSATION[:2]) and p.target == "a blue boat." for p in probes)
    state = sets[0].to_state()
    assert ProbeSet.coerce(json.loads(json.dumps(state)))[0] == probes[0]


def test_generate_mode_attributes_the_models_answer_to_the_conversation(chat_model):
    model, tok = chat_model
    probes = ProbeSet([Probe(CONVERSATION[:2])], generate=True, generation_args={"max_new_tokens": 4})
    result = ProbeMonitor(probes).run(model, tok, 0).results[0]
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert [t.id for t in result.output[0].source] == tok(prompt)["input_ids"]
    assert len(result.output[0].generated) >= 1


@pytest.mark.parametrize(("messages", "match"), [
    ([], "empty"),
    ([{"role": "user", "content": FACTS}], "does not end with an assistant turn"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "assistant", "content": "a blue boat."}], "only the assistant's answer"),
])
def test_bad_conversations_are_refused_when_the_probe_set_is_built(messages, match):
    with pytest.raises(InvalidInputError, match=match):
        ProbeSet([Probe(messages)])


def test_evidence_must_occur_in_a_message_and_may_ignore_case():
    with pytest.raises(InvalidInputError, match="in any message"):
        ProbeSet([Probe(CONVERSATION, evidence=("assistant",))])  # only the template writes it
    with pytest.raises(InvalidInputError, match="evidence_ignore_case"):
        ProbeSet([Probe(CONVERSATION, evidence=("leo keeps",))])
    ProbeSet([Probe(CONVERSATION, evidence=("leo keeps",), evidence_ignore_case=True)])


def test_a_tokenizer_without_a_chat_template_fails_before_training(hf_models, tmp_path):
    model, tok = hf_models["gpt2"]
    assert not tok.chat_template
    monitor = AttributionMonitor([Probe(CONVERSATION)], every_n_train_steps=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[monitor], logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    module = PairsLM(copy.deepcopy(model), tok, [("a", " b")] * 4)
    with pytest.raises(TokenizerError, match="no chat template"):
        trainer.fit(module)
    assert module.losses == []  # not one training step ran


def test_lightning_fit_with_chat_probes_logs_the_answer_tokens_only(chat_model, tmp_path):
    model, tok = chat_model
    tb = TensorBoardLogger(tmp_path, name="tb")
    monitor = AttributionMonitor([Probe(CONVERSATION, name="leo")], every_n_train_steps=2)
    pairs = [(tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True), "a blue boat.")] * 8
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[monitor], logger=tb, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(PairsLM(copy.deepcopy(model), tok, pairs, lr=1e-3))
    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "scalars": 0}).Reload()
    table = events.Tensors("attribution/saliency/leo/table/text_summary")[-1].tensor_proto.string_val[0].decode()
    header = next(line for line in table.splitlines() if line.startswith("| token |"))
    columns = [c.strip() for c in header.split("|")[2:-1]]
    expected = tok.convert_ids_to_tokens(_answer_token_ids(tok, CONVERSATION[:2], "a blue boat."))
    assert len(columns) == len(expected) and "im" not in " ".join(columns)
    assert [e.step for e in events.Scalars("attribution/saliency/leo/message_mass/1_user")] == [0, 2]
    share = monitor.reports[-1].results[0].message_mass["1_user"]
    assert f"Attribution per message: 0\\_system {monitor.reports[-1].results[0].message_mass['0_system']:.3f}, " \
           f"1\\_user {share:.3f}" in table


def test_plain_text_probes_are_unchanged(hf_models):
    model, tok = hf_models["gpt2"]
    result = ProbeMonitor([Probe("the cat sat", " on the mat")]).run(model, tok, 0).results[0]
    assert result.message_mass == {} and tok.decode([t.id for t in result.output[0].generated]) == " on the mat"


THINKING_TEMPLATE = (  # a Qwen3-like template: the last assistant turn gets an empty reasoning block first
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_text_a_template_writes_before_the_answer_is_context_not_steps(chat_model):
    model, tok = chat_model
    tok = copy.deepcopy(tok)
    tok.chat_template = THINKING_TEMPLATE
    result = ProbeMonitor([Probe(CONVERSATION)]).run(model, tok, 0).results[0]
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    start = full.rindex("a blue boat.")  # the answer, not the same words in the facts
    encoding = tok(full, return_offsets_mapping=True)
    expected = [i for i, (s, e) in zip(encoding["input_ids"], encoding["offset_mapping"])
                if s < start + len("a blue boat.") and e > start]
    assert [t.id for t in result.output[0].generated] == expected
    assert "think" not in tok.decode(expected)


def test_a_run_with_chat_probes_resumes_its_drift_history(chat_model):
    model, tok = chat_model
    first = ProbeMonitor([Probe(CONVERSATION, name="leo")])
    first.run(model, tok, 0)
    resumed = ProbeMonitor([Probe(CONVERSATION, name="leo")])
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    result = resumed.run(model, tok, 5).results[0]
    assert result.reference_step == 0 and result.drift_reference["cosine"] == pytest.approx(1.0)
    assert result.drift_reference["tokens_compared"] == len(result.aggregated.generated)
