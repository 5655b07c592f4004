"""Attach the AttributionCallback to TRL's SFTTrainer on a chat dataset (tiny local chat model: runs in seconds).

    .venv/bin/python examples/trl_sft_chat.py
    .venv/bin/tensorboard --logdir outputs/example-trl/runs    # SFTTrainer's scalars and ours, one run

The probe is a conversation rendered with the tokenizer's own chat template; only the assistant's
content tokens are attributed, and ``message_mass/<i>_<role>`` says which message the answer comes from.
"""

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from inseq_lightning.callbacks import AttributionCallback
from inseq_lightning.demo.task import make_dataset
from inseq_lightning.monitor import Probe
from inseq_lightning.tiny_models import chat_tokenizer, tiny_llama

model, tokenizer = tiny_llama(tokenizer=chat_tokenizer())
model.train()
conversations = Dataset.from_list([
    {"messages": [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer.strip()}]}
    for e in make_dataset(32)])
args = SFTConfig(output_dir="outputs/example-trl", max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3,
                 logging_steps=1, save_strategy="no", report_to=["tensorboard"], use_cpu=True, disable_tqdm=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=conversations, processing_class=tokenizer)
callback = AttributionCallback.attach(  # trainer= lets it log into the TensorBoardCallback's own writer
    trainer,
    [Probe([{"role": "system", "content": "Answer from the facts."},
            {"role": "user", "content": "Facts: Mia keeps a red kite. Leo keeps a blue boat.\n"
                                        "Question: What does Leo keep?\nAnswer:"},
            {"role": "assistant", "content": "a blue boat."}],
           evidence=("Leo keeps a blue boat.",), name="leo")],
    step_scores=("probability", "entropy"),
    attribution_strategy="steps", attribution_steps=4,  # SFTTrainer evaluates only when given an eval set
)
trainer.train()

if trainer.is_world_process_zero():
    for row in callback.history.probes["leo"].rows:
        print(f"step {row['step']:>3}: p={row['step_score/probability']:.4f} "
              f"evidence mass={row['evidence_mass']:.3f} user mass={row['message_mass/1_user']:.3f}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {args.output_dir}/runs "
          "(Scalars: attribution/saliency/leo/..., Text: the token tables, Attributions: the HTML views)")
