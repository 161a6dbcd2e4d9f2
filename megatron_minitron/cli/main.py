"""`minitron STAGE [hydra overrides...]`: dispatch to cli/<stage>.py's main(overrides)."""

import importlib
import sys
from typing import List, Optional

from megatron_minitron.cli.help import STAGES, stage_help, usage


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"minitron: unknown stage {stage!r}\n{usage()}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in overrides):
        print(stage_help(stage))
        return 0
    try:
        name = f"megatron_minitron.cli.{stage.replace('-', '_')}"
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            print(f"minitron: stage {stage!r} is not built yet", file=sys.stderr)
            return 2
        raise
    from megatron_minitron.cli.errors import run_stage

    return run_stage(module.main, overrides)


if __name__ == "__main__":
    sys.exit(main())
