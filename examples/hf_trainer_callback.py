"""Attach the AttributionCallback to a Hugging Face Trainer run (tiny local GPT-2: runs in seconds).

    .venv/bin/python examples/hf_trainer_callback.py
    .venv/bin/tensorboard --logdir outputs/example-hf/runs     # the trainer's scalars and ours, one run

Multi-process: the same script under ``torchrun --nproc_per_node 2`` (CPU: gloo) logs each step once.
"""

from transformers import Trainer, TrainingArguments

from inseq_lightning.callbacks import AttributionCallback
from inseq_lightning.demo.module import PairsCollator
from inseq_lightning.demo.task import make_dataset
from inseq_lightning.monitor import Probe
from inseq_lightning.tiny_models import tiny_gpt2

model, tokenizer = tiny_gpt2()
model.train()
pairs = [(e.prompt, e.answer) for e in make_dataset(64)]
args = TrainingArguments(output_dir="outputs/example-hf", max_steps=20, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, learning_rate=1e-3, eval_strategy="steps", eval_steps=5,
                         save_strategy="steps", save_steps=10, logging_steps=1, report_to=["tensorboard"],
                         remove_unused_columns=False, use_cpu=True,
                         restore_callback_states_from_checkpoint=True)  # resuming keeps the drift history
trainer = Trainer(model=model, args=args, train_dataset=pairs, eval_dataset=pairs[:8], processing_class=tokenizer,
                  data_collator=PairsCollator(tokenizer, False, tokenizer.eos_token_id))
callback = AttributionCallback.attach(  # trainer= lets it log into the TensorBoardCallback's own writer
    trainer,
    [Probe("Facts: Mia keeps a red kite. Leo keeps a blue boat.\nQuestion: What does Leo keep?\nAnswer:",
           " a blue boat.", evidence=("Leo keeps a blue boat.",), name="leo")],
    step_scores=("probability", "entropy"),
    attribution_strategy="eval",  # right after each evaluation: the weights the next checkpoint stores
)
trainer.train()

if trainer.is_world_process_zero():
    for row in callback.history.probes["leo"].rows:
        # callback.checkpoints: the checkpoint saved next after each attributed step (exactly its weights when
        # the steps coincide)
        print(f"step {row['step']:>3} (next checkpoint: {callback.checkpoints.get(str(row['step']), 'none')}): "
              f"p={row['step_score/probability']:.4f} evidence mass={row['evidence_mass']:.3f}")
