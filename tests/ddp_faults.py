"""`imgrec` with a fault injected into one process of a torchrun group, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_faults.py KIND RANK EPOCH STEP -- train ...

runs `imgrec train ...` in every process; in process RANK, when its training loader is about to yield batch STEP
(counted from 1) of epoch EPOCH, it raises a RuntimeError (KIND "raise"), kills itself with SIGKILL (KIND
"kill", only in the first attempt: a group that torchrun restarted runs clean), sends itself SIGTERM (KIND
"term": as if that one process were asked to stop), or stops answering for ten minutes (KIND "hang").
"""

from __future__ import annotations

import os
import signal
import sys
import time

from imgrec.cli import main
from imgrec.data import loaders


def inject(kind: str, rank: int, epoch: int, step: int) -> None:
    """Wrap TensorLoader.__iter__ so that this process fails as asked."""
    original = loaders.TensorLoader.__iter__
    here = int(os.environ.get("RANK", "0"))
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0

    def iterate(self: loaders.TensorLoader):  # type: ignore[no-untyped-def]
        for batch in original(self):
            if self.shuffle and here == rank and self.epoch == epoch and self.batches_done == step:
                if kind == "raise":
                    raise RuntimeError(f"injected failure in process {here}")
                if kind == "hang":
                    time.sleep(600)
                elif kind == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                elif first_attempt:
                    os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    loaders.TensorLoader.__iter__ = iterate  # type: ignore[method-assign]


if __name__ == "__main__":
    kind, rank, epoch, step, separator, *argv = sys.argv[1:]
    assert kind in ("raise", "kill", "term", "hang") and separator == "--", sys.argv
    inject(kind, int(rank), int(epoch), int(step))
    raise SystemExit(main(argv))
