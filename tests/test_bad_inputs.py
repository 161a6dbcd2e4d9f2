"""Every bad input and fault a new user can hit, one table: exit 2, a one-line error that names
the field the user set and the fix, no traceback, and no file that existed before changed.

Cases run in-process through the CLI's own `main(argv)` with stdout and stderr captured (what a
user's terminal shows); the fixtures (a tiny checkpoint, its scores, damaged copies, data files)
are built once for the module."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cli_process import minitron_in_process as cli

FAST = ["data.tokenizer.type=byte", "data.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.eval_interval=0", "train.eval_iters=1",
        "logger.backend=none", "logger.progress_bar=false", "train.optimizer.lr_warmup_iters=0",
        "train.train_iters=1"]
CASE_LIMIT_S = 30
"""Far above what any check needs; a case reaching real work (a pipeline) is stopped here."""


def _copy_checkpoint(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst)
    return dst


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Inputs every case may use (paths by name), built once; read-only for the cases."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shown = os.environ.pop("MINITRON_TRACEBACK", None)  # an escaped error must show its trace
    rc, _, err = cli("train", *FAST, f"run.dir={root / 'teacher'}")
    assert rc == 0, err
    ckpt = root / "teacher" / "checkpoints"
    step = ckpt / (ckpt / "latest").read_text().strip()
    for name, blocks in (("scores.st", "[1]"), ("scores_noblocks.st", "[]")):
        rc, _, err = cli("importance", *FAST, "importance.num_samples=2", f"importance.checkpoint"
                         f"={ckpt}", f"importance.output={root / name}",
                         f"importance.block_sizes={blocks}")
        assert rc == 0, err
    scores = (root / "scores.st").read_bytes()
    (root / "scores_truncated.st").write_bytes(scores[: len(scores) // 2])
    (root / "scores_random.st").write_bytes(os.urandom(4096))
    (root / "scores_empty.st").write_bytes(b"")
    (root / "damaged_run" / "importance").mkdir(parents=True)
    shutil.copy(root / "scores_truncated.st",
                root / "damaged_run" / "importance" / "scores.safetensors")
    _copy_checkpoint(step, root / "empty_common", lambda d: (d / "common.pt").write_bytes(b""))
    _copy_checkpoint(step, root / "bad_header", lambda d: (d / "minitron.json").write_text("{"))
    _copy_checkpoint(step, root / "header_list",
                     lambda d: (d / "minitron.json").write_text("[1, 2]"))
    _copy_checkpoint(step, root / "header_keys", lambda d: (d / "minitron.json").write_text(
        json.dumps({**json.loads((step / "minitron.json").read_text()), "colour": 1})))
    (root / "empty_dir").mkdir()
    (root / "a_file").write_text("not a folder\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (root / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (root / "nokey.jsonl").write_text('{"body": "no text field"}\n')
    (root / "notstr.jsonl").write_text('{"text": 5}\n')
    (root / "good.txt").write_text("Once upon a time.\n")
    (root / "hf_unknown").mkdir()
    (root / "hf_unknown" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc, _, err = cli("convert", "convert.direction=mcore_to_hf", f"convert.input={ckpt}",
                     f"convert.output={root / 'hf_tiny'}")
    assert rc == 0, err
    (root / "hf_noweights").mkdir()
    shutil.copy(root / "hf_tiny" / "config.json", root / "hf_noweights" / "config.json")
    (root / "hf_partial").mkdir()
    (root / "hf_partial" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "dangling").mkdir()
    (root / "dangling" / "latest").write_text("step_0000009")
    (root / "hf_badjson").mkdir()
    (root / "hf_badjson" / "config.json").write_text("{not json")
    prev = root / "prev_run"  # an earlier run's files in the run dir cases write to
    prev.mkdir()
    shutil.copy(root / "teacher" / "metrics.jsonl", prev / "metrics.jsonl")
    shutil.copy(root / "teacher" / "config.yaml", prev / "config.yaml")
    yield {"root": root, "ckpt": ckpt, "step": step, "run": prev}
    if shown is not None:
        os.environ["MINITRON_TRACEBACK"] = shown


def _hashes(root: Path):
    """Every file's sha256, but the run-dir lock: a refused run may leave that empty file (an
    fcntl lock lives on an inode; deleting it on release would race the next holder)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not (
                p.name == ".lock" and p.stat().st_size == 0)}


# (id, stage, overrides with {name} placeholders from the fixture, field named, fix words)
CASES = [
    # --- any stage: the command line itself
    ("unknown_key", "train", ["train.iters=3"], "train.iters", "spelling"),
    ("flag", "train", ["--iters"], "--iters", "key=value"),
    ("wrong_type", "train", ["train.train_iters=abc"], "train.train_iters", "Fix:"),
    ("unknown_model_group", "train", ["model=llama_1b"], "model", "Fix:"),
    ("new_key_plus", "train", ["+train.foo=1"], "train.foo", "remove it"),
    # --- train
    ("train_iters_zero", "train", ["train.train_iters=0"], "train.train_iters", "positive"),
    ("lr_negative", "train", ["train.optimizer.lr=-1"], "train.optimizer.lr", "lr > 0"),
    ("lr_decay_style", "train", ["train.optimizer.lr_decay_style=step"],
     "train.optimizer.lr_decay_style", "cosine"),
    ("time_budget_cosine", "train", ["train.time_budget_s=60"],
     "train.optimizer.lr_decay_style", "constant, or wsd"),
    ("warmup_too_long", "train", ["train.optimizer.lr_warmup_iters=5"],
     "train.optimizer.lr_warmup_iters", "fewer warmup"),
    ("global_batch_indivisible", "train", ["train.global_batch_size=3"],
     "train.global_batch_size", "multiple of"),
    ("data_paths_missing", "train", ["data.paths=[{root}/no_corpus]"], "data.paths", "Fix:"),
    ("data_split", "train", ["data.split='1,2'"], "data.split", "949,50,1"),
    ("data_split_unquoted", "train", ["data.split=1,2"], "data.split", "quote"),
    ("seq_length_one", "train", ["data.seq_length=1"], "data.seq_length", "longer"),
    ("seq_length_over_positions", "train", ["data.seq_length=1024"], "data.seq_length",
     "max_position_embeddings"),
    ("tokenizer_type", "train", ["data.tokenizer.type=wordpiece"], "data.tokenizer.type",
     "sentencepiece"),
    ("tokenizer_path_missing", "train",
     ["data.tokenizer.type=sentencepiece", "data.tokenizer.path={root}/no.model"],
     "data.tokenizer.path", "Fix:"),
    ("heads_vs_tp", "train", ["parallel.tensor_model_parallel_size=3"],
     "model.num_attention_heads", "multiple of 3"),
    ("layers_vs_pp", "train", ["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"],
     "model.num_layers", "pipeline"),
    ("keep_last_zero", "train", ["checkpoint.keep_last=0"], "checkpoint.keep_last", "keep at"),
    ("logger_backend", "train", ["logger.backend=tensorboard"], "logger.backend", "wandb"),
    ("logger_mode", "train", ["logger.mode=sometimes"], "logger.mode", "offline"),
    ("device_unknown", "train", ["runtime.device=tpu"], "runtime.device", "use one of"),
    ("impl_unknown", "train", ["runtime.transformer_impl=flash"], "runtime.transformer_impl",
     "use one of"),
    ("precision_unknown", "train", ["runtime.precision=fp8"], "runtime.precision", "use one of"),
    ("load_missing", "train", ["checkpoint.load={root}/no_ckpt"], "checkpoint.load",
     "step_* folder"),
    ("load_empty_dir", "train", ["checkpoint.load={root}/empty_dir"], "checkpoint.load",
     "step_* folder"),
    ("load_empty_common", "train", ["checkpoint.load={root}/empty_common"], "checkpoint.load",
     "common.pt"),
    ("load_bad_header", "train", ["checkpoint.load={root}/bad_header"], "checkpoint.load",
     "minitron.json"),
    ("load_header_list", "train", ["checkpoint.load={root}/header_list"], "checkpoint.load",
     "minitron.json"),
    ("load_header_keys", "train", ["checkpoint.load={root}/header_keys"], "checkpoint.load",
     "minitron.json"),
    ("load_other_arch", "train", ["checkpoint.load={ckpt}", "model.hidden_size=128"],
     "model.hidden_size", "drop the model overrides"),
    ("run_dir_is_file", "train", ["run.dir={root}/a_file"], "run.dir", "folder"),
    ("run_dir_unwritable", "train", ["run.dir=/proc/minitron_run"], "run.dir", "writable"),
    ("save_dir_is_file", "train", ["checkpoint.save={root}/a_file"], "checkpoint.save",
     "folder"),
    ("load_dangling_latest", "train", ["checkpoint.load={root}/dangling"], "checkpoint.load",
     "step_* folder"),
    ("load_is_file", "train", ["checkpoint.load={root}/a_file"], "checkpoint.load",
     "step_* folder"),
    ("save_under_file", "train", ["checkpoint.save={root}/a_file/ckpts"], "checkpoint.save",
     "folder"),
    ("tp_above_world", "train", ["parallel.tensor_model_parallel_size=2"],
     "parallel.tensor_model_parallel_size", "processes"),
    ("data_weights_count", "train", ["data.paths=[{root}/a,{root}/b]", "data.weights=[1.0]"],
     "data.weights", "one weight per path"),
    # --- data
    ("data_input_missing", "data", ["preprocess.input=[{root}/no.jsonl]"], "preprocess.input",
     "Fix:"),
    ("data_jsonl_not_utf8", "data", ["preprocess.input=[{root}/latin1.jsonl]"],
     "preprocess.input", "UTF-8"),
    ("data_txt_not_utf8", "data", ["preprocess.input=[{root}/latin1.txt]"], "preprocess.input",
     "UTF-8"),
    ("data_jsonl_broken", "data", ["preprocess.input=[{root}/broken.jsonl]"],
     "preprocess.input", "Fix:"),
    ("data_jsonl_no_key", "data", ["preprocess.input=[{root}/nokey.jsonl]"],
     "preprocess.json_key", "Fix:"),
    ("data_jsonl_not_text", "data", ["preprocess.input=[{root}/notstr.jsonl]"],
     "preprocess.json_key", "Fix:"),
    ("data_prefix_extension", "data",
     ["preprocess.input=[{root}/good.txt]", "preprocess.output_prefix={root}/out.bin"],
     "preprocess.output_prefix", "without .bin"),
    ("data_json_key_empty", "data", ["preprocess.json_key="], "preprocess.json_key", "Fix:"),
    ("data_prefix_without_input", "data", ["preprocess.output_prefix={root}/new/out"],
     "preprocess.input", "Fix:"),
    ("data_prefix_under_file", "data",
     ["preprocess.input=[{root}/good.txt]", "preprocess.output_prefix={root}/a_file/out"],
     "preprocess.output_prefix", "Fix:"),
    ("data_empty_folder", "data", ["preprocess.input=[{root}/empty_dir]"], "preprocess.input",
     "Fix:"),
    # --- convert
    ("convert_no_input", "convert", ["convert.output={root}/new_conv"], "convert.input",
     "convert.input=PATH"),
    ("convert_no_output", "convert", ["convert.input={root}/hf_unknown"], "convert.output",
     "convert.output=PATH"),
    ("convert_direction", "convert", ["convert.direction=sideways"], "convert.direction",
     "use one of"),
    ("convert_dtype", "convert", ["convert.dtype=int8"], "convert.dtype", "use one of"),
    ("convert_model_type", "convert", ["convert.model_type=gpt2"], "convert.model_type",
     "use one of"),
    ("convert_hf_missing", "convert",
     ["convert.input={root}/no_hf", "convert.output={root}/new_conv"], "convert.input", "Fix:"),
    ("convert_hf_unsupported", "convert",
     ["convert.input={root}/hf_unknown", "convert.output={root}/new_conv"], "config.json", "Fix:"),
    ("convert_hf_partial_config", "convert",
     ["convert.input={root}/hf_partial", "convert.output={root}/new_conv"], "config.json",
     "complete"),
    ("convert_hf_no_weights", "convert",
     ["convert.input={root}/hf_noweights", "convert.output={root}/new_conv"], "hf_noweights",
     "Fix:"),
    ("convert_hf_bad_json", "convert",
     ["convert.input={root}/hf_badjson", "convert.output={root}/new_conv"], "config.json", "Fix:"),
    ("convert_mcore_missing", "convert",
     ["convert.direction=mcore_to_hf", "convert.input={root}/no_ckpt",
      "convert.output={root}/new_hf"], "convert.input", "step_* folder"),
    ("convert_mcore_bad_header", "convert",
     ["convert.direction=mcore_to_hf", "convert.input={root}/bad_header",
      "convert.output={root}/new_hf"], "convert.input", "minitron.json"),
    ("convert_output_is_file", "convert",
     ["convert.direction=mcore_to_hf", "convert.input={ckpt}", "convert.output={root}/a_file"],
     "convert.output", "folder"),
    ("convert_output_is_file_import", "convert",
     ["convert.input={root}/hf_tiny", "convert.output={root}/a_file"], "convert.output",
     "folder"),
    ("convert_smollm2_as_checkpoint", "convert",
     ["convert.direction=mcore_to_hf", "convert.input=smollm2", "convert.output={root}/new_hf"],
     "convert.input", "step_* folder"),
    # --- importance
    ("importance_no_checkpoint", "importance", [], "importance.checkpoint",
     "set importance.checkpoint"),
    ("importance_missing", "importance", ["importance.checkpoint={root}/no_ckpt"],
     "importance.checkpoint", "step_* folder"),
    ("importance_empty_common", "importance", ["importance.checkpoint={root}/empty_common"],
     "importance.checkpoint", "common.pt"),
    ("importance_num_samples", "importance", ["importance.checkpoint={ckpt}",
                                              "importance.num_samples=0"],
     "importance.num_samples", "Fix:"),
    ("importance_output_is_dir", "importance",
     ["importance.checkpoint={ckpt}", "importance.output={root}/empty_dir"],
     "importance.output", "Fix:"),
    ("importance_source", "importance", ["importance.checkpoint={ckpt}", "importance.source=guess"],
     "importance.source", "Fix:"),
    ("importance_header_list", "importance", ["importance.checkpoint={root}/header_list"],
     "importance.checkpoint", "minitron.json"),
    ("importance_output_under_file", "importance",
     ["importance.checkpoint={ckpt}", "importance.output={root}/a_file/scores.st"],
     "importance.output", "folder"),
    # --- prune
    ("prune_no_checkpoint", "prune", [], "prune.checkpoint", "set prune.checkpoint"),
    ("prune_missing", "prune", ["prune.checkpoint={root}/no_ckpt"], "prune.checkpoint",
     "step_* folder"),
    ("prune_bad_header", "prune", ["prune.checkpoint={root}/bad_header"], "prune.checkpoint",
     "minitron.json"),
    ("prune_scores_missing", "prune",
     ["prune.checkpoint={ckpt}", "prune.scores={root}/no_scores.st",
      "prune.target.ffn_hidden_size=96"], "prune.scores", "Fix:"),
    ("prune_scores_truncated", "prune",
     ["prune.checkpoint={ckpt}", "prune.scores={root}/scores_truncated.st",
      "prune.target.ffn_hidden_size=96"], "prune.scores", "minitron importance"),
    ("prune_scores_random", "prune",
     ["prune.checkpoint={ckpt}", "prune.scores={root}/scores_random.st",
      "prune.target.ffn_hidden_size=96"], "prune.scores", "minitron importance"),
    ("prune_scores_empty", "prune",
     ["prune.checkpoint={ckpt}", "prune.scores={root}/scores_empty.st",
      "prune.target.ffn_hidden_size=96"], "prune.scores", "minitron importance"),
    ("prune_run_dir_scores_truncated", "prune",
     ["prune.checkpoint={ckpt}", "run.dir={root}/damaged_run", "prune.target.ffn_hidden_size=96"],
     "prune.scores", "minitron importance"),
    ("prune_target_zero", "prune", ["prune.checkpoint={ckpt}", "prune.target.hidden_size=0"],
     "prune.target.hidden_size", "positive"),
    ("prune_target_grows", "prune",
     ["prune.checkpoint={ckpt}", "prune.scores={root}/scores.st",
      "prune.target.ffn_hidden_size=1000"], "prune.target.ffn_hidden_size", "Fix:"),
    ("prune_head_mode", "prune", ["prune.checkpoint={ckpt}", "prune.head_mode=rows"],
     "prune.head_mode", "Fix:"),
    ("prune_drop_layers_range", "prune",
     ["prune.checkpoint={ckpt}", "prune.depth_mode=list", "prune.drop_layers=[9]",
      "prune.target.num_layers=3"], "prune.drop_layers", "Fix:"),
    ("prune_budget_above_source", "prune",
     ["prune.checkpoint={ckpt}", "prune.scores={root}/scores.st", "prune.param_budget=1000000000"],
     "prune.param_budget", "Fix:"),
    ("prune_block_without_block_scores", "prune",
     ["prune.checkpoint={ckpt}", "prune.scores={root}/scores_noblocks.st",
      "prune.depth_mode=block", "prune.target.num_layers=2"], "prune.depth_mode", "Fix:"),
    ("prune_output_is_file", "prune",
     ["prune.checkpoint={ckpt}", "prune.scores={root}/scores.st",
      "prune.target.ffn_hidden_size=96", "prune.output={root}/a_file"], "prune.output",
     "folder"),
    ("prune_from_load_missing", "prune", ["checkpoint.load={root}/no_ckpt"], "checkpoint.load",
     "step_* folder"),
    # --- distill
    ("distill_no_teacher", "distill", ["checkpoint.load={ckpt}"], "distill.teacher_checkpoint",
     "set distill.teacher_checkpoint"),
    ("distill_teacher_missing", "distill",
     ["distill.teacher_checkpoint={root}/no_ckpt", "checkpoint.load={ckpt}"],
     "distill.teacher_checkpoint", "step_* folder"),
    ("distill_teacher_bad_header", "distill",
     ["distill.teacher_checkpoint={root}/bad_header", "checkpoint.load={ckpt}"],
     "distill.teacher_checkpoint", "minitron.json"),
    ("distill_teacher_empty_common", "distill",
     ["distill.teacher_checkpoint={root}/empty_common", "checkpoint.load={ckpt}"],
     "distill.teacher_checkpoint", "common.pt"),
    ("distill_layer_pairs", "distill",
     ["distill.teacher_checkpoint={ckpt}", "checkpoint.load={ckpt}",
      "distill.hidden_loss=cosine", "distill.layer_pairs=[[9,1]]"], "distill.layer_pairs",
     "Fix:"),
    ("distill_hidden_loss", "distill",
     ["distill.teacher_checkpoint={ckpt}", "checkpoint.load={ckpt}",
      "distill.hidden_loss=l7"], "distill.hidden_loss", "Fix:"),
    ("distill_student_missing", "distill",
     ["distill.teacher_checkpoint={ckpt}", "checkpoint.load={root}/no_ckpt"],
     "checkpoint.load", "step_* folder"),
    # --- search
    ("search_budget_zero", "search", ["search.param_budget=0"], "search.param_budget", "Fix:"),
    ("search_source_missing", "search", ["search.checkpoint={root}/no_ckpt"],
     "search.checkpoint", "Fix:"),
    ("search_metric", "search", ["search.checkpoint={ckpt}", "search.metric=accuracy"],
     "search.metric", "Fix:"),
    ("search_tolerance", "search", ["search.checkpoint={ckpt}", "search.tolerance=2"],
     "search.tolerance", "Fix:"),
    ("search_no_budget", "search", ["search.checkpoint={ckpt}"], "search.param_budget",
     "set search.param_budget"),
    ("search_no_checkpoint", "search", ["search.param_budget=100000"], "search.checkpoint",
     "set search.checkpoint"),
    ("search_scores_random", "search",
     ["search.checkpoint={ckpt}", "search.param_budget=100000",
      "search.scores={root}/scores_random.st"], "search.scores", "minitron importance"),
    ("search_teacher_bad_header", "search",
     ["search.checkpoint={ckpt}", "search.param_budget=100000",
      "distill.teacher_checkpoint={root}/bad_header"], "distill.teacher_checkpoint",
     "minitron.json"),
    # --- eval
    ("eval_no_checkpoint", "eval", [], "eval.checkpoint", "set eval.checkpoint"),
    ("eval_missing", "eval", ["eval.checkpoint={root}/no_ckpt"], "eval.checkpoint",
     "step_* folder"),
    ("eval_header_keys", "eval", ["eval.checkpoint={root}/header_keys"], "eval.checkpoint",
     "minitron.json"),
    ("eval_empty_common", "eval", ["eval.checkpoint={root}/empty_common"], "eval.checkpoint",
     "common.pt"),
    ("eval_splits", "eval", ["eval.checkpoint={ckpt}", "eval.splits=[dev]"], "eval.splits",
     "use some of"),
    ("eval_text_missing", "eval", ["eval.checkpoint={ckpt}", "eval.text_files=[{root}/no.txt]"],
     "eval.text_files", "Fix:"),
    ("eval_unknown_task", "eval", ["eval.checkpoint={ckpt}", "eval.tasks=[hellaswog_typo]"],
     "eval.tasks", "Fix:"),
    ("eval_output_is_file", "eval", ["eval.checkpoint={ckpt}", "eval.output={root}/a_file"],
     "eval.output", "folder"),
    ("eval_limit_zero", "eval", ["eval.checkpoint={ckpt}", "eval.limit=0"], "eval.limit",
     "null"),
    ("eval_text_is_folder", "eval",
     ["eval.checkpoint={ckpt}", "eval.text_files=[{root}/empty_dir]"], "eval.text_files",
     "Fix:"),
    ("eval_text_not_utf8", "eval",
     ["eval.checkpoint={ckpt}", "eval.text_files=[{root}/good.txt,{root}/latin1.txt]"],
     "eval.text_files", "UTF-8"),
    ("eval_task_paths_missing", "eval",
     ["eval.checkpoint={ckpt}", "eval.tasks=[minitron_next_line]",
      "eval.task_paths=[{root}/no_tasks]"], "eval.task_paths", "Fix:"),
    ("eval_micro_batch_zero", "eval", ["eval.checkpoint={ckpt}", "eval.micro_batch_size=0"],
     "eval.micro_batch_size", "positive"),
    ("eval_num_samples_zero", "eval", ["eval.checkpoint={ckpt}", "eval.num_samples=0"],
     "eval.num_samples", "positive"),
    ("eval_seq_length", "eval", ["eval.checkpoint={ckpt}", "data.seq_length=513"],
     "data.seq_length", "max_position_embeddings"),
    # --- pipeline
    ("pipeline_experiment_typo", "pipeline", ["experiment=smkoe"], "experiment", "smoke"),
    ("pipeline_target", "pipeline", ["experiment=smoke", "pipeline.target=guess"],
     "pipeline.target", "use one of"),
    ("pipeline_force", "pipeline", ["experiment=smoke", "pipeline.force=[teachr]"],
     "pipeline.force", "stage names"),
    ("pipeline_fraction", "pipeline", ["experiment=smoke", "pipeline.param_fraction=1.5"],
     "pipeline.param_fraction", "half"),
    ("pipeline_teacher_missing", "pipeline",
     ["experiment=smoke", "pipeline.teacher={root}/no_ckpt"], "pipeline.teacher", "Fix:"),
    ("pipeline_teacher_bad_header", "pipeline",
     ["experiment=smoke", "pipeline.teacher={root}/bad_header"], "pipeline.teacher",
     "minitron.json"),
    ("pipeline_run_dir_is_file", "pipeline", ["experiment=smoke", "run.dir={root}/a_file"],
     "run.dir", "folder"),
    ("pipeline_seq_length", "pipeline", ["experiment=smoke", "data.seq_length=4096"],
     "data.seq_length", "max_position_embeddings"),
    ("pipeline_unknown_task", "pipeline", ["experiment=smoke", "eval.tasks=[nope]"],
     "eval.tasks", "Fix:"),
    ("pipeline_text_missing", "pipeline", ["experiment=smoke", "eval.text_files=[{root}/no.txt]"],
     "eval.text_files", "Fix:"),
    ("pipeline_teacher_hf_partial", "pipeline",
     ["experiment=smoke", "pipeline.teacher={root}/hf_partial"], "config.json", "complete"),
    ("pipeline_teacher_hf_seq_length", "pipeline",
     ["experiment=smoke", "pipeline.teacher={root}/hf_tiny", "data.seq_length=600"],
     "data.seq_length", "max_position_embeddings"),
    ("pipeline_iterations_zero", "pipeline", ["experiment=smoke", "pipeline.iterations=0"],
     "pipeline.iterations", "one-shot"),
    ("pipeline_teacher_empty_common", "pipeline",
     ["experiment=smoke", "pipeline.teacher={root}/empty_common"], "pipeline.teacher",
     "common.pt"),
    ("experiment_typo_in_train", "train", ["experiment=smoke_test"], "experiment", "smoke"),
]


def _argv(stage, args, fx):
    """FAST, then the case's overrides; a case's key replaces FAST's (Hydra refuses repeats)."""
    case = [a.format(root=fx["root"], ckpt=fx["ckpt"]) for a in args]
    keys = {a.split("=", 1)[0] for a in case}
    base = [a for a in FAST + [f"run.dir={fx['run']}"] if a.split("=", 1)[0] not in keys]
    return [stage, *base, *case]


def test_the_table_holds_sixty_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 60
    assert len({(c[1], tuple(c[2])) for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} >= {"train", "data", "convert", "importance", "prune", "distill",
                                    "search", "eval", "pipeline"}


@pytest.mark.parametrize("name,stage,args,field,fix", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_error(fx, name, stage, args, field, fix):
    argv = _argv(stage, args, fx)
    before = _hashes(fx["root"])
    rc, out, err = cli(*argv, limit_s=CASE_LIMIT_S)
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    line = [ln for ln in err.splitlines() if ln.startswith("minitron: error:")]
    assert len(line) == 1, err
    assert field in line[0] and "Fix:" in line[0] and fix in line[0], line[0]
    assert _hashes(fx["root"]) == before


def test_loader_errors_outside_exception_are_caught_and_interrupts_are_not(monkeypatch, capsys):
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from megatron_minitron.cli.errors import EXIT_ERROR, run_stage

    def raise_(e):
        def stage(overrides):
            raise e
        return stage

    monkeypatch.setenv("MINITRON_TRACEBACK", "0")
    failure = CheckpointException("load failed", {0: _wrap_exception(ValueError("torn"))})
    assert run_stage(raise_(failure), []) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CheckpointException" in err[0]
    for e in (KeyboardInterrupt(), SystemExit(5)):
        with pytest.raises(type(e)):
            run_stage(raise_(e), [])
