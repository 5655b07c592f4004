"""inseq 0.7.1's ``inseq.commands`` import paths, for code moving over (the commands themselves are in
:mod:`inseq_lightning.cli`)."""
