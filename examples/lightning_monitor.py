"""Attach the AttributionMonitor to a Lightning fine-tuning run (tiny local GPT-2: runs in seconds).

    .venv/bin/python examples/lightning_monitor.py
    .venv/bin/tensorboard --logdir outputs/example-monitor      # Scalars, Images and Text tabs
"""

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from inseq_lightning.callbacks import AttributionMonitor
from inseq_lightning.demo.module import PairsLM
from inseq_lightning.demo.task import make_dataset
from inseq_lightning.monitor import Probe, ProbeSet
from inseq_lightning.tiny_models import tiny_gpt2

model, tokenizer = tiny_gpt2()
pairs = [(e.prompt, e.answer) for e in make_dataset(64)]
probes = ProbeSet([
    Probe("Facts: Mia keeps a red kite. Leo keeps a blue boat.\nQuestion: What does Leo keep?\nAnswer:",
          " a blue boat.", evidence=("Leo keeps a blue boat.",), name="leo"),
    Probe("Facts: Ava keeps a green lamp. Max keeps a black hat.\nQuestion: What does Ava keep?\nAnswer:",
          " a green lamp.", evidence=("Ava keeps a green lamp.",), name="ava"),
])
monitor = AttributionMonitor(probes, method="integrated_gradients", method_kwargs={"n_steps": 16},
                             step_scores=("probability", "entropy"), every_n_train_steps=5)
trainer = pl.Trainer(accelerator="cpu", max_steps=20, accumulate_grad_batches=2, callbacks=[monitor],
                     logger=TensorBoardLogger("outputs", name="example-monitor"), enable_checkpointing=False)
trainer.fit(PairsLM(model, tokenizer, pairs, lr=1e-3))

for row in monitor.history.probes["leo"].rows:
    print(f"step {row['step']:>3}: p={row['step_score/probability']:.4f} "
          f"evidence mass={row['evidence_mass']:.3f} cosine vs step 0={row.get('drift_ref/cosine', float('nan')):.3f}")
