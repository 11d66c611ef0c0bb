"""`--nproc N`'s launcher: torch's elastic agent, with its failures in amptrain's terms.

`python -m amptrain.launcher ARGS` runs `torch.distributed.run` with ARGS. The workers say what
went wrong, each in one line, so the agent's own report (a traceback and a table of the failed
processes, its warnings as it stops the other workers) is left out, and the exit code is the
first failed worker's, as one process would have given it: 3 for a write that failed, 128 + N
for a worker ended by signal N. A SIGTERM or SIGINT to the agent, which stops every worker (they
checkpoint), ends it with 143 or 130 instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    """Run torch's launcher with `argv`; the exit code of the first worker that failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if "LOGLEVEL" not in os.environ:  # torch's own switch for these loggers wins
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)

    try:
        run(get_args_parser().parse_args(list(argv)))
    except ChildFailedError as exc:
        return exit_code(exc.get_first_failure()[1].exitcode)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def exit_code(worker_code: int) -> int:
    """A worker's exit status as a shell reports it: 128 + N for signal N."""
    return 128 - worker_code if worker_code < 0 else worker_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
