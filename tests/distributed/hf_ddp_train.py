"""Run under ``torchrun --nproc_per_node 2``: an HF Trainer DDP run (gloo, CPU) with the AttributionCallback.

Rank zero writes the final weights to ``<out>/final`` so the test can attribute them in one process.
"""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from leave import leave_together
from transformers import Trainer, TrainingArguments, set_seed

from inseq_lightning.callbacks import AttributionCallback
from inseq_lightning.demo.module import PairsCollator
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.tiny_models import tiny_gpt2

out = Path(sys.argv[1])
set_seed(0)
model, tok = tiny_gpt2()
model.train()
args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                         remove_unused_columns=False, disable_tqdm=True, ddp_backend="gloo")
trainer = Trainer(model=model, args=args, train_dataset=[(e.prompt, e.answer) for e in make_dataset(32)],
                  data_collator=PairsCollator(tok, False, tok.eos_token_id), processing_class=tok)
callback = AttributionCallback.attach(trainer, make_probes(3), attribution_strategy="steps", attribution_steps=2,
                                      save_files=True)
trainer.train()
if trainer.is_world_process_zero():
    trainer.model.save_pretrained(out / "final")
    (out / "reports.json").write_text(json.dumps({"steps": [r.step for r in callback.reports],
                                                  "world_size": trainer.args.world_size}))
else:
    assert callback.reports == [], "only rank zero gets reports"
leave_together()
