"""How a script launched on several processes (torchrun, accelerate launch) ends."""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist


def end_processes(error: str | None = None) -> None:
    """End a script's process: print ``error`` (if any) and exit with status 1, else 0 when the script
    ran on one process.

    On several processes every process first waits for the others (without this a rank can abort at
    interpreter exit while another is still tearing down), the process group is destroyed, and the
    process then ends *without* running the destructors of what is still alive (``os._exit``, after
    flushing the output and the logs). Why: the trainer's DDP wrapper keeps the gloo process group alive,
    and its destructor joins the group's worker threads while holding the GIL; a worker thread that is
    still dropping the last reference to a finished collective's tensors needs the GIL, so the process
    could hang forever once everything was written (seen on a loaded 2-core machine, one run in ~20).
    """
    if not (dist.is_available() and dist.is_initialized()):
        if error:
            sys.exit(error)
        return
    dist.barrier()
    dist.destroy_process_group()
    if error:
        print(error, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if error else 0)
