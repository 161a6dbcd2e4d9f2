"""Small local lm-eval tasks made from the demo corpus's held-out work (The Tempest).

No demo split contains The Tempest (data/corpus.py), so these test text the models never saw.
Items are generated deterministically (fixed seed, fixed positions) into JSONL files under the
cache (`<cache>/eval_tasks/v<VERSION>/<task>.jsonl`) on first use; the YAMLs beside this file
load them through `custom_dataset`, so lm-eval never goes online.

  minitron_next_line   multiple choice: after 4 lines of the play, pick the true next spoken
                       line among 4 (3 distractors are spoken lines from elsewhere in the play)
  minitron_cloze       generate_until: complete a spoken line's last word (exact match, case
                       and punctuation ignored), given the 2 lines before it
  minitron_tempest     loglikelihood_rolling: word/byte perplexity of the play's passages
All three carry the tag `minitron_demo`.
"""

import json
import random
import re
from pathlib import Path
from typing import Callable, Dict, List

from megatron_minitron.data.corpus import DEFAULT_CACHE_DIR, cache_root, demo_heldout_text
from megatron_minitron.runtime import atomic_files

VERSION = 1
SEED = 1234
NUM_ITEMS = 200
NUM_PASSAGES = 40


def spoken(line: str) -> bool:
    """A line of dialogue: not a speaker tag (upper case), stage direction or heading."""
    s = line.strip()
    return len(s) >= 20 and not s.isupper() and not s.startswith("[")


def _spread(candidates: List[int], n: int) -> List[int]:
    """n positions evenly spread over the candidates (all when there are fewer)."""
    if len(candidates) <= n:
        return candidates
    return [candidates[i * len(candidates) // n] for i in range(n)]


def next_line_items(text: str, n: int = NUM_ITEMS) -> List[Dict]:
    lines = [line for line in text.split("\n") if line.strip()]
    pool = [i for i, line in enumerate(lines) if spoken(line)]
    rng = random.Random(SEED)
    items = []
    for i in _spread([i for i in pool if i >= 4], n):
        others = rng.sample([j for j in pool if abs(j - i) > 8], 3)
        choices = [lines[j].strip() for j in others]
        label = rng.randrange(4)
        choices.insert(label, lines[i].strip())
        items.append({"context": "\n".join(lines[i - 4:i]) + "\n", "choices": choices,
                      "label": label})
    return items


def cloze_items(text: str, n: int = NUM_ITEMS) -> List[Dict]:
    lines = [line for line in text.split("\n") if line.strip()]
    candidates = []
    for i, line in enumerate(lines[2:], start=2):
        m = re.match(r"^(.*\S)\s+([A-Za-z]{3,})[^A-Za-z]*$", line.strip())
        if spoken(line) and m and len(m.group(1).split()) >= 3:
            candidates.append((i, m.group(1), m.group(2)))
    picked = _spread(list(range(len(candidates))), n)
    return [{"context": "\n".join(lines[i - 2:i]) + "\n" + head + " ", "target": word}
            for i, head, word in (candidates[k] for k in picked)]


def passage_items(text: str, n: int = NUM_PASSAGES) -> List[Dict]:
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 200]
    return [{"text": paras[k]} for k in _spread(list(range(len(paras))), n)]


BUILDERS: Dict[str, Callable[[str], List[Dict]]] = {
    "minitron_next_line": next_line_items, "minitron_cloze": cloze_items,
    "minitron_tempest": passage_items}


def task_file(task: str, cache_dir: str = DEFAULT_CACHE_DIR) -> Path:
    """The task's JSONL, generated from the held-out text on first use (atomic rename)."""
    path = cache_root(cache_dir) / "eval_tasks" / f"v{VERSION}" / f"{task}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        items = BUILDERS[task](demo_heldout_text(cache_dir=cache_dir))
        atomic_files.write_text(path, "".join(json.dumps(item) + "\n" for item in items))
    return path


def _load(task: str, cache_dir: str = DEFAULT_CACHE_DIR, **_):
    """lm-eval's custom_dataset hook: {"test": Dataset} from the task's JSONL."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(task_file(task, cache_dir))})


def next_line(**kwargs):
    return _load("minitron_next_line", **kwargs)


def cloze(**kwargs):
    return _load("minitron_cloze", **kwargs)


def tempest(**kwargs):
    return _load("minitron_tempest", **kwargs)
