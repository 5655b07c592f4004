"""How the torchrun scripts end: every rank leaves together and skips the interpreter's teardown."""

import os
import sys

import torch.distributed as dist


def leave_together() -> None:
    """Barrier, destroy the process group, then exit without finalizing the interpreter.

    A rank that exits while its peer still holds the gloo group can abort it, hence the barrier. And
    an object that outlives ``destroy_process_group`` (DDP's reducer keeps its process group) is
    destroyed during interpreter finalization, where gloo's worker threads can abort the process with
    "terminate called without an active exception" after all the work is done (seen once in CI on a
    loaded machine; pytorch/pytorch#179291 describes the same teardown crash). Everything the test
    reads is written and closed before this call, so skipping the teardown loses nothing.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
