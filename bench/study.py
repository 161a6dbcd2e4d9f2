"""The Minitron study (issue 8): nine ablations on one teacher and the seed spread
that tells a result from noise, resumable, reported.

    python3 bench/study.py budget=quick          # SmolLM2-135M, under an hour on a 2-core CPU
    python3 bench/study.py budget=full           # the issue's sizes, for a GPU
    python3 bench/study.py budget=tiny dir=/tmp/s ablations=[1,2]

Study keys (bench/minitron_study/config.py): budget, dir, docs_dir, ablations. Any other
key=value is a Hydra override of the base config (conf/experiment/study_<budget>.yaml) for every
arm. After every arm has run once, a second pass reruns the arms compared by each claim that one
seed left within noise under the budget's other seeds (runtime.seed 2 and 3; tiny: 2 only), and
that claim is judged over the seeds. Rerunning the same command skips finished arms and shared
work; docs/RESULTS.md (below its study marker line: the text above it is kept) and
docs/results.json are rewritten after every arm, the plots at the end."""

import dataclasses
import sys

from omegaconf import OmegaConf

from megatron_minitron.config.loader import override_list, to_typed
from minitron_study.config import StudyConfig
from minitron_study.report import write_report
from minitron_study.runner import run_study

_STUDY_KEYS = {f.name for f in dataclasses.fields(StudyConfig)} - {"overrides"}


def parse(argv) -> StudyConfig:
    args = override_list(argv)
    own = [a for a in args if a.split("=", 1)[0] in _STUDY_KEYS]
    rest = [a for a in args if a not in own]
    study = to_typed(OmegaConf.from_dotlist(own), StudyConfig)
    return dataclasses.replace(study, overrides=study.overrides + rest)


def main(argv) -> None:
    study = parse(argv)
    run_study(study, on_progress=lambda: write_report(study, plots=False))
    print(f"study: wrote {write_report(study)}", flush=True)


if __name__ == "__main__":  # dist_checkpointing spawns workers that re-import this file
    main(sys.argv[1:])
