"""The fine-tuning demo: a generated task, a small LightningModule, and the monitored run."""
