"""What a user sees first: the console of `minitron pipeline experiment=smoke` holds only our
lines (the libraries' notices and bars go to the stage's log file unless logger.verbose,
runtime/console.py), `minitron --help` lists every stage, and the README's first screen says
how to install, run and test."""

import re
from pathlib import Path

import pytest

from cli_process import minitron

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

OURS = ("minitron", "train ", "importance passes", "eval models", "teacher:", "model ",
        "teacher ", "pruned ", "distilled ", "Hugging Face export:", "report:")
"""How each console line of a pipeline run starts: `minitron...` (stage headers, the choices
said once, warnings and errors), the progress bars' descriptions (training/loop.py,
importance/runner.py, pipeline/stages.py) and the summary table (cli/pipeline.py)."""

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
CUSTOM_KWARGS = "Custom kwargs can be passed to `--metadata`"
"""lm-eval's notice for every task it builds (eval.tasks of experiment=smoke)."""


def console_lines(text: str):
    """The non-empty lines a terminal ends up showing: ANSI escapes removed and each
    carriage-return redraw (rich and tqdm bars) reduced to what was drawn last."""
    lines = []
    for line in ANSI.sub("", text).split("\n"):
        shown = line.rstrip("\r").rsplit("\r", 1)[-1].rstrip()
        if shown.strip():
            lines.append(shown)
    return lines


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(run.dir, stdout, stderr) of the smoke pipeline run as a user runs it, every model
    scored afresh (eval.cache=false) so that lm-eval runs."""
    run = tmp_path_factory.mktemp("first_screen")
    # from a folder outside any git repository, as users run it (lm-eval asks git for a hash)
    p = minitron("pipeline", f"run.dir={run}", "experiment=smoke", "eval.cache=false",
                 cwd=run)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return run, out, err


def test_the_pipeline_console_shows_only_our_lines(smoke):
    _, out, err = smoke
    assert "minitron pipeline: stage eval" in out
    foreign = [line for line in console_lines(out) + console_lines(err)
               if not line.startswith(OURS)]
    assert not foreign, ("console lines that are not ours (route them to the stage's log, "
                         "runtime/console.py foreign_output):\n" + "\n".join(foreign))


def test_lm_eval_notices_go_to_the_eval_log_and_to_the_console_when_verbose(smoke, tmp_path):
    run, out, err = smoke
    assert CUSTOM_KWARGS in (run / "eval" / "stage.log").read_text()
    assert CUSTOM_KWARGS not in out + err
    # the eval stage alone on the run's student, its lm-eval tasks only
    p = minitron("eval", "experiment=smoke", f"run.dir={tmp_path}",
                 f"eval.checkpoint={run / 'distill' / 'checkpoints'}", "eval.splits=[]",
                 "eval.heldout_chars=0", "logger.verbose=true")
    v_out, v_err = p.communicate(timeout=300)
    assert p.returncode == 0, v_err[-3000:]
    assert CUSTOM_KWARGS in v_out + v_err


def _help(*args):
    p = minitron(*args, "--help")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return out


def test_help_lists_every_stage():
    from megatron_minitron.cli.help import STAGES

    listed = {line.split()[0] for line in _help().splitlines() if line.startswith("  ")}
    assert set(STAGES) <= listed, f"missing from `minitron --help`: {set(STAGES) - listed}"


def test_stage_help_shows_each_setting_with_its_default():
    assert "  importance.precision = 'fp32'" in _help("importance").splitlines()


def test_readme_opens_with_install_and_run():
    lines = README.read_text().splitlines()
    fences = [i for i, line in enumerate(lines) if line.lstrip().startswith("```")]
    assert len(fences) >= 2, "README.md has no ``` fenced block"
    start, end = fences[0], fences[1]
    assert start < 20, f"README.md's first fenced block starts on line {start + 1}, not in 1-20"
    block = "\n".join(lines[start + 1:end])
    assert "pip install" in block and "minitron pipeline" in block, block


TEST_COMMAND = "python3 -m pytest -q -n 2 --dist loadfile tests"


def test_readme_test_command_is_on_its_first_screen_and_what_ci_runs():
    head = "\n".join(README.read_text().splitlines()[:40])
    assert TEST_COMMAND in head, f"README.md's first 40 lines lack `{TEST_COMMAND}`"
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text()


NARRATIVE = re.compile(r"session \d+|sessions? \d+-\d+|faster hour|shared machine|"
                       r"in an hour when|previous demo", re.IGNORECASE)
"""Phrases of a story of past work, which documentation of the code as it is has no use for."""


def _around(text: str, m: re.Match, chars: int) -> str:
    return text[max(0, m.start() - chars):m.end() + chars].replace("\n", " ")


def test_docs_describe_the_code_not_past_work():
    hits = []
    for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        hits += [f"{path.relative_to(REPO)}: ...{_around(text, m, 60)}..."
                 for m in NARRATIVE.finditer(text)]
    assert not hits, "narrative of past work:\n" + "\n".join(hits)


BOLD_TIME = re.compile(r"\*\*[\d.,]+ ?min")
CPU_NAME = re.compile(r"AMD|Intel|Xeon|EPYC")
DATE = re.compile(r"2026-\d\d-\d\d")


def test_readme_time_figures_name_their_cpu_and_date():
    text = README.read_text()
    bare = [_around(text, m, 80) for m in BOLD_TIME.finditer(text)
            if not (CPU_NAME.search(_around(text, m, 300)) and DATE.search(_around(text, m, 300)))]
    assert not bare, ("bold time figures without a CPU name and a date within 300 "
                      "characters:\n" + "\n".join(bare))
