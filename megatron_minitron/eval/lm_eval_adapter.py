"""Our checkpoints as lm-eval-harness models, and lm-eval task runs that stay offline.

`MinitronLM(chunks, tokenizer, ctx, vocab_size, max_length)` implements lm-eval's three request
types on the model in `chunks` (any TP/PP layout; every rank runs the same requests, rank 0
reports):
  loglikelihood          sum of log p(continuation | context) and whether greedy decoding
                         reproduces the continuation, via eval/token_scores.py
  loglikelihood_rolling  the whole text in lm-eval's disjoint rolling windows of max_length
  generate_until         greedy decoding (no KV cache: one full forward per new token) until a
                         stop string or max_gen_toks
`run_tasks(lm, tasks, ...)` runs lm-eval's simple_evaluate with the shipped tasks folder
(eval/tasks/) and any extra task folders on the task path; datasets are local JSONL files and
HF_DATASETS_OFFLINE is set, so nothing is fetched.
"""

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.data.tokenizer import Tokenizer
from megatron_minitron.eval.token_scores import score_sequences

TASKS_DIR = Path(__file__).parent / "tasks"


class MinitronLM(TemplateLM):
    """An lm-eval model over GPTModel chunks already built and loaded for this rank."""

    def __init__(self, chunks: List[torch.nn.Module], tokenizer: Tokenizer, ctx, vocab_size: int,
                 max_length: int, batch_size: int = 8, max_gen_toks: int = 32):
        super().__init__()
        self.chunks, self.tok, self.ctx = chunks, tokenizer, ctx
        self.vocab_size, self.max_length = vocab_size, max_length
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs) -> List[int]:
        return self.tok.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    @property
    def tokenizer_name(self) -> str:
        return f"{self.tok.name}-{self.tok.identity()}"

    def _score(self, sequences: List[List[int]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """score_sequences in chunks of similar length (less padding), in the input order."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: List[Any] = [None] * len(sequences)
        step = self.batch_size * 4
        for k in range(0, len(order), step):
            idx = order[k:k + step]
            res = score_sequences(self.chunks, [sequences[i] for i in idx], self.ctx,
                                  self.vocab_size, self.batch_size, self.tok.eod)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _continuation_scores(self, pairs: List[Tuple[List[int], List[int]]]
                             ) -> List[Tuple[float, bool]]:
        """(sum log p(cont | ctx), greedy) with the context cut from the left to max_length."""
        seqs = [(c + x)[-(self.max_length + 1):] for c, x in pairs]
        results = []
        for (_, cont), (logprob, argmax) in zip(pairs, self._score(seqs)):
            n = len(cont)
            target = torch.tensor(cont[-n:] if n else [], dtype=torch.long)
            results.append((float(logprob[-n:].sum()) if n else 0.0,
                            bool(torch.equal(argmax[-n:], target)) if n else True))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> List[Tuple[float, bool]]:
        return self._continuation_scores([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for w in get_rolling_token_windows(self.tok.encode(text), self.eot_token_id,
                                               self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._continuation_scores(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        prompts, stops, budgets = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            until = gen_kwargs.get("until") or [self.tok.decode([self.eot_token_id])]
            stops.append([until] if isinstance(until, str) else list(until))
            budgets.append(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)))
            ids = [self.eot_token_id] + self.tok.encode(context)
            prompts.append(ids[-max(1, self.max_length - budgets[-1]):])
        generated: List[List[int]] = [[] for _ in requests]
        active = [i for i in range(len(requests)) if budgets[i] > 0]
        while active:
            # a dummy last token: argmax[-1] is then the prediction after the whole sequence
            scores = self._score([prompts[i] + generated[i] + [self.eot_token_id]
                                  for i in active])
            still = []
            for i, (_, argmax) in zip(active, scores):
                nxt = int(argmax[-1])
                generated[i].append(nxt)
                text = self.tok.decode(generated[i])
                if (nxt != self.eot_token_id and len(generated[i]) < budgets[i]
                        and not any(s in text for s in stops[i])):
                    still.append(i)
            active = still
        outputs = []
        for i, ids in enumerate(generated):
            text = self.tok.decode([t for t in ids if t != self.eot_token_id])
            for s in stops[i]:
                text = text.split(s)[0] if s else text
            outputs.append(text)
        return outputs


def check_tasks(tasks: Sequence[str], task_paths: Sequence[str] = (),
                field: str = "eval.tasks") -> None:
    """Every name is a task, group or tag on the task path, before any model is loaded."""
    from lm_eval.tasks import TaskManager

    missing = [p for p in task_paths if not Path(p).expanduser().is_dir()]
    if missing:
        raise ConfigError("eval.task_paths", f"no folder {missing[0]}", "fix the folder path")
    known = TaskManager(include_path=[str(TASKS_DIR), *map(str, task_paths)],
                        include_defaults=False).all_tasks
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(field, f"unknown tasks {unknown}",
                          f"use tasks from {sorted(known)} or add their YAMLs with "
                          "eval.task_paths")


def run_tasks(lm: MinitronLM, tasks: List[str], task_paths: Sequence[str] = (),
              limit: Optional[int] = None, num_fewshot: Optional[int] = None,
              seed: int = 1234) -> Dict[str, Dict[str, Any]]:
    """lm-eval's results per task ({task: {metric,filter: value}}) on the shipped tasks plus
    the folders in task_paths. Offline: datasets must be local files."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, task_paths)],
                          include_defaults=False)
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    return {name: {k: v if isinstance(v, str) else float(v) for k, v in res.items()
                   if isinstance(v, (int, float, str)) and k not in ("name", "alias")}
            for name, res in (out or {}).get("results", {}).items()}
