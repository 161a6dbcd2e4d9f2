"""Exit codes and the one-line failure reason every stage promises."""

import os
import sys
import traceback
from typing import Callable, List

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.runtime.signals import EXIT_REQUEUE, Requeue, announce_requeue

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2


def run_stage(fn: Callable[[List[str]], None], overrides: List[str]) -> int:
    try:
        fn(overrides)
    except ConfigError as e:
        print(f"minitron: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Requeue as e:
        announce_requeue(str(e))
        print(f"minitron: pre-empted, checkpoint saved, requeue: {e}; rerun the same command "
              "to resume from it", file=sys.stderr)
        return EXIT_REQUEUE
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # also loaders' errors outside Exception (torch's checkpoint)
        if not isinstance(e, Exception) and not _is_loader_error(e):
            raise
        if os.environ.get("MINITRON_TRACEBACK", "1") != "0":
            traceback.print_exc()
        print(f"minitron: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _is_loader_error(e: BaseException) -> bool:
    """torch.distributed.checkpoint's CheckpointException derives from BaseException."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:
        return False
    return isinstance(e, CheckpointException)
