"""Attribute a decoder-only and an encoder-decoder model built locally, and write the HTML views."""

from pathlib import Path

import inseq_lightning as il
from inseq_lightning.tiny_models import tiny_gpt2, tiny_marian

out_dir = Path("outputs/examples")
out_dir.mkdir(parents=True, exist_ok=True)

model, tok = tiny_gpt2()
causal = il.load_model(model, "integrated_gradients", tokenizer=tok)
out = causal.attribute("The cat sat", "The cat sat on the mat", step_scores=["probability", "entropy"], n_steps=20)
(out_dir / "gpt2.html").write_text(il.show_attributions(out, display=False, return_html=True), encoding="utf-8")
out.show()

model, tok = tiny_marian()
seq2seq = il.load_model(model, "saliency", tokenizer=tok)
out = seq2seq.attribute("Hello world", "Le chat est noir", attribute_target=True, step_scores=["probability"])
(out_dir / "marian.html").write_text(il.show_attributions(out, display=False, return_html=True), encoding="utf-8")
out.show()
print(f"HTML written under {out_dir}")
