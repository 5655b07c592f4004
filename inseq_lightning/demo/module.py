"""A minimal LightningModule that fine-tunes a Hugging Face causal or seq2seq LM on (prompt, answer) pairs."""

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader


class PairsCollator:
    """Right-padded batches; the loss covers the answer tokens only (prompt labels are -100)."""

    def __init__(self, tokenizer, seq2seq: bool, pad_id: int):
        self.tokenizer, self.seq2seq, self.pad_id = tokenizer, seq2seq, pad_id

    def __call__(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        inputs, labels = [], []
        for prompt, answer in pairs:
            if self.seq2seq:
                inputs.append(self.tokenizer(prompt)["input_ids"])
                labels.append(self.tokenizer(text_target=answer)["input_ids"])
            else:
                prompt_ids = self.tokenizer(prompt)["input_ids"]
                answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
                inputs.append(prompt_ids + answer_ids)
                labels.append([-100] * len(prompt_ids) + answer_ids)
        width = max(map(len, inputs))
        batch = {
            "input_ids": torch.tensor([x + [self.pad_id] * (width - len(x)) for x in inputs]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs]),
        }
        label_width = max(map(len, labels))
        batch["labels"] = torch.tensor([y + [-100] * (label_width - len(y)) for y in labels])
        return batch


class PairsLM(LightningModule):
    """Holds the HF model in ``self.model`` and its tokenizer in ``self.tokenizer`` (where
    :class:`~inseq_lightning.callbacks.AttributionMonitor` looks for them)."""

    def __init__(self, model, tokenizer, pairs: list[tuple[str, str]], lr: float = 1e-4, batch_size: int = 4,
                 val_pairs: list[tuple[str, str]] | None = None):
        super().__init__()
        # from_pretrained returns eval mode, and Lightning 2.6 keeps the modes it finds: switch
        # dropout on for training here (Lightning restores it after each validation loop).
        model.train()
        self.model, self.tokenizer = model, tokenizer
        self.pairs, self.val_pairs = pairs, val_pairs or pairs[:4]
        self.lr, self.batch_size = lr, batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collate = PairsCollator(tokenizer, bool(model.config.is_encoder_decoder), pad)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("val/loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("test/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)

    def train_dataloader(self):
        # A seeded generator: same order with and without a monitor (it restores the RNG anyway).
        generator = torch.Generator().manual_seed(0)
        return DataLoader(self.pairs, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate,
                          generator=generator)

    def val_dataloader(self):
        return DataLoader(self.val_pairs, batch_size=self.batch_size, collate_fn=self.collate)

    def test_dataloader(self):
        return DataLoader(self.val_pairs, batch_size=self.batch_size, collate_fn=self.collate)
