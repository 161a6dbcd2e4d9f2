"""Shared work of the study: one teacher, one scores file per importance section, one pruned
checkpoint per (scores, prune section), one retrained model per recipe, one evaluation per
checkpoint. Each lives in a folder named by a hash of what produced it and is finished when its
`stage.json` exists (pipeline.run.StageRunner), so arms reuse it and a rerun skips it."""

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict, List

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.config.data import TokenizerConfig
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.pipeline import stages
from megatron_minitron.pipeline.run import StageRunner


def key(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _data_key(cfg: MinitronConfig) -> Dict:
    return {"data": dataclasses.asdict(cfg.data), "seed": cfg.runtime.seed,
            "precision": cfg.runtime.precision}


class _CostedRunner(StageRunner):
    """Also adds up the recorded seconds of every stage it hands out, run now or earlier, so an
    arm reports what it would cost on its own even when its work was shared."""

    seconds = 0.0

    def run(self, name, fn):
        outputs = super().run(name, fn)
        marker = self.run_dir / name / "stage.json"
        if marker.is_file():
            self.seconds += json.loads(marker.read_text())["seconds"]
        return outputs


class Artifacts:
    def __init__(self, root: Path, rank: int):
        self.runner = _CostedRunner(root, [], rank)

    def teacher(self, cfg: MinitronConfig) -> str:
        out = self.runner.run("teacher", lambda o: stages.import_teacher(cfg, o))
        if cfg.pipeline.correction_iters:
            out = self.runner.run("correction", lambda o: stages.correct_teacher(
                cfg, out["checkpoint"], o))
        return out["checkpoint"]

    def scores(self, cfg: MinitronConfig, student: str) -> Dict:
        imp = cfg.importance
        name = f"scores/{imp.source}_{key(student, dataclasses.asdict(imp), _data_key(cfg))}"
        return self.runner.run(name, lambda o: stages.score(cfg, student,
                                                            str(o / "scores.safetensors")))

    def pruned(self, cfg: MinitronConfig, student: str, scores: str) -> str:
        name = f"pruned/{key(student, scores, dataclasses.asdict(cfg.prune))}"
        return self.runner.run(name, lambda o: stages.prune(cfg, student, scores,
                                                            str(o / "checkpoint")))["checkpoint"]

    def _train_key(self, cfg: MinitronConfig, iters: int) -> str:
        return key(dataclasses.asdict(cfg.train), iters, _data_key(cfg))

    def distilled(self, cfg: MinitronConfig, teacher: str, student: str, iters: int) -> Dict:
        cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline,
                                                                    distill_iters=iters))
        name = (f"trained/kd_{key(teacher, student, dataclasses.asdict(cfg.distill))}"
                f"_{self._train_key(cfg, iters)}")
        return self.runner.run(name, lambda o: stages.distill_student(cfg, teacher, student, o))

    def cross_entropy(self, cfg: MinitronConfig, student: str, iters: int) -> Dict:
        from megatron_minitron.training.lm import train_lm

        name = f"trained/ce_{key(student)}_{self._train_key(cfg, iters)}"
        return self.runner.run(name, lambda o: stages._train(cfg, student, o, iters, train_lm))

    def scratch(self, cfg: MinitronConfig, teacher: str, architecture: str, iters: int,
                save_interval: int) -> List[Dict]:
        """`architecture` from random init (the teacher's tokenizer), LM loss for `iters` steps;
        returns every saved checkpoint with the tokens it had seen."""
        from megatron_minitron.training.lm import train_lm

        tok = ckpt.read_header(teacher).tokenizer
        init_cfg = dataclasses.replace(
            cfg, model=ckpt.read_header(architecture).model,
            data=dataclasses.replace(cfg.data, tokenizer=TokenizerConfig(
                type=str(tok["type"]), path=tok.get("path"))))
        k = key(architecture, _data_key(cfg))
        init = self.runner.run(f"scratch/init_{k}", lambda o: stages.init_teacher(init_cfg, o))
        # keep every checkpoint: the loss curve is what ablation 7 measures
        train_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            cfg.checkpoint, save_interval=save_interval, keep_last=iters))
        name = f"scratch/train_{k}_{self._train_key(train_cfg, iters)}_{save_interval}"
        out = self.runner.run(name, lambda o: stages._train(train_cfg, init["checkpoint"], o,
                                                            iters, train_lm))
        root = Path(out["checkpoint"]).parent
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        return [{"checkpoint": str(p), "tokens": int(p.name.split("_")[1]) * tokens_per_step}
                for p in sorted(root.glob("step_*")) if ckpt.resolve(str(p))]

    def evaluate(self, cfg: MinitronConfig, checkpoint: str) -> Dict:
        name = "eval/" + key(checkpoint, cfg.pipeline.eval_samples, cfg.train.micro_batch_size,
                             _data_key(cfg))
        return self.runner.run(name, lambda o: stages.evaluate_models(
            cfg, {"model": checkpoint}, o))["model"]
