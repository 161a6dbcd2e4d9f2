"""Hugging Face folders <-> our dist checkpoints, through a TP=1/PP=1 model in one process.

Import streams tensor by tensor from safetensors (never pickle) straight into the built model's
parameters, so memory stays near one model copy. The saved dist checkpoint then loads at any
TP/PP. Names live in hf_keymap; this module owns files, dtypes and the model round trip.
"""

import json
import shutil
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_minitron.checkpoint import dist as dist_ckpt
from megatron_minitron.checkpoint import hf_keymap as keymap
from megatron_minitron.checkpoint.hf_keymap import hf_export_problem  # noqa: F401 (public API)
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.runtime import atomic_files

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")
TOKENIZER_DIR = "tokenizer"


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "file not found", "point to a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(str(path), f"not valid JSON ({e})", "fix or re-download it") from e


def check_hf_folder(hf_dir: str) -> ModelConfig:
    """The model an HF folder holds, from config.json and the weight index, read before any
    work; errors name the file and key."""
    src = Path(hf_dir).expanduser()
    cfg = keymap.model_config_from_hf(_read_json(src / "config.json"), str(src / "config.json"))
    _weight_files(src)
    return cfg


def _weight_files(hf_dir: Path) -> Dict[str, Path]:
    """tensor name -> safetensors file, from the shard index or the single file."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = {name: hf_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise ConfigError(f"{index}:weight_map", f"names shard {f.name}, which is missing",
                                  "download every shard the index lists")
        return files
    single = hf_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    hint = " (pickle .bin weights are never loaded)" if any(hf_dir.glob("*.bin")) else ""
    raise ConfigError(str(single), f"no safetensors weights in {hf_dir}{hint}",
                      "provide model.safetensors or model.safetensors.index.json + shards")


def tokenizer_vocab_size(tok_dir: Path) -> Optional[int]:
    """Token count of tokenizer.json (added tokens included); None when there is none."""
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def copy_tokenizer(src: Path, dst: Path, embedding_rows: int) -> List[str]:
    """Copy the tokenizer files of `src` into `dst`; its vocabulary must fit the embedding."""
    n = tokenizer_vocab_size(src)
    if n is not None and n > embedding_rows:
        raise ConfigError(f"{src / 'tokenizer.json'}:vocab", f"the tokenizer has {n} tokens but "
                          f"the embedding (config.json vocab_size) has {embedding_rows} rows",
                          "use the tokenizer that belongs to these weights")
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return names


class _SingleProcessModel:
    """A TP=1/PP=1 GPTModel built in this process (torch.distributed of one if none yet)."""

    def __init__(self, cfg: ModelConfig):
        import torch.distributed as dist

        from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
        from megatron_minitron.models.builder import build_model
        from megatron_minitron.runtime.distributed import initialize

        self.owns_runtime = not dist.is_initialized()
        runtime = RuntimeConfig(device="cpu", transformer_impl="local", precision="fp32")
        ctx = initialize(ParallelConfig(), runtime)
        if ctx.world_size != 1 or ctx.tp_size != 1 or ctx.pp_size != 1:
            raise ConfigError("convert", f"runs in one process, found world size "
                              f"{ctx.world_size}", "run `minitron convert` without torchrun")
        self.chunks = build_model(cfg, ParallelConfig(), runtime, ctx.device)

    def close(self) -> None:
        if self.owns_runtime:
            from megatron_minitron.runtime.distributed import teardown

            teardown()


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _hf_extra(hf_cfg: Dict[str, Any], hf_dir: Path, handles) -> Dict[str, Any]:
    """What export needs to give back the model it imported: ids, family, weight dtype, and
    the config.json fields our model config does not hold (Mistral's and Phi-3's sliding
    window)."""
    extra = {k: hf_cfg.get(k) for k in keymap.TOKEN_ID_FIELDS if hf_cfg.get(k) is not None}
    extra["model_type"] = hf_cfg["model_type"]
    dtypes = Counter(SAFETENSORS_DTYPES.get(h.get_slice(k).get_dtype())
                     for h in handles.values() for k in h.keys())
    dtypes.pop(None, None)
    if dtypes:
        extra["dtype"] = dtypes.most_common(1)[0][0]
    for key in keymap.KEPT_HF_FIELDS.get(hf_cfg["model_type"], ()):
        if hf_cfg.get(key) is not None:
            extra[key] = hf_cfg[key]
    if (hf_dir / "generation_config.json").is_file():
        extra["generation_config"] = _read_json(hf_dir / "generation_config.json")
    return extra


def hf_to_mcore(hf_dir: str, out_dir: str, step: int = 0) -> Path:
    """Convert an HF Llama/Mistral/Qwen2/Qwen3/Phi-3 folder into our checkpoint under out_dir.
    The tokenizer is copied to out_dir/tokenizer and recorded in the header."""
    from safetensors import safe_open

    src, out = Path(hf_dir).expanduser(), Path(out_dir).expanduser()
    hf_cfg = _read_json(src / "config.json")
    cfg = keymap.model_config_from_hf(hf_cfg, str(src / "config.json"))
    files = _weight_files(src)
    tok_dir = out / TOKENIZER_DIR
    tokenizer = {"type": "huggingface", "path": str(tok_dir.resolve())} if copy_tokenizer(
        src, tok_dir, cfg.vocab_size) else {}
    model = _SingleProcessModel(cfg)
    try:
        params = dict(model.chunks[0].named_parameters())
        with ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt"))
                       for f in sorted(set(files.values()))}
            extra = _hf_extra(hf_cfg, src, handles)
            used = set()
            for tm in keymap.tensor_maps(cfg, hf_cfg["model_type"]):
                parts = [_read_tensor(src, name, files, handles, shape)
                         for name, shape in zip(tm.hf, keymap.hf_shapes(tm, cfg))]
                with torch.no_grad():
                    params[tm.mcore].copy_(keymap.to_mcore(tm, parts, cfg))
                used.update(tm.hf)
        extra_keys = sorted(n for n in files if n not in used and not keymap.is_ignored_hf_key(n, cfg))
        if extra_keys:
            raise ConfigError(f"{files[extra_keys[0]]}:{extra_keys[0]}",
                              f"{len(extra_keys)} tensors have no megatron counterpart",
                              "check config.json describes these weights")
        header = dist_ckpt.CheckpointHeader(model=cfg, tokenizer=tokenizer,
                                            extra={"hf": extra})
        return dist_ckpt.save(str(out), step, model.chunks, header)
    finally:
        model.close()


def _read_tensor(src: Path, name: str, files: Dict[str, Path], handles, shape) -> torch.Tensor:
    if name not in files:
        raise ConfigError(f"{src}:{name}", "tensor missing from the safetensors files",
                          "check config.json (e.g. tie_word_embeddings) matches the weights")
    t = handles[files[name]].get_tensor(name)
    if not t.is_floating_point():
        raise ConfigError(f"{files[name]}:{name}", f"dtype {t.dtype} is not a float type "
                          "(quantized weights?)", "convert a bf16/fp16/fp32 checkpoint")
    if tuple(t.shape) != tuple(shape):
        raise ConfigError(f"{files[name]}:{name}", f"shape {tuple(t.shape)}, config.json "
                          f"implies {tuple(shape)}", "use the config.json of these weights")
    return t.float()


def mcore_to_hf(ckpt_path: str, out_dir: str, dtype: Optional[str] = None,
                model_type: Optional[str] = None) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer.
    dtype None: the dtype the weights were imported from HF in, else float32 (lossless)."""
    from safetensors.torch import save_file

    header = dist_ckpt.read_header(ckpt_path, "convert.input")
    cfg, hf_extra = header.model, header.extra.get("hf", {})
    dtype = dtype or hf_extra.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError("convert.dtype", f"unknown {dtype!r}", f"use one of {sorted(DTYPES)}")
    model_type = model_type or hf_extra.get("model_type") or keymap.default_model_type(cfg)
    hf_cfg = keymap.hf_config_from_model(cfg, model_type, dtype, hf_extra)
    model = _SingleProcessModel(cfg)
    try:
        dist_ckpt.load(ckpt_path, model.chunks)
        sd = {k: v for k, v in model.chunks[0].state_dict().items() if "_extra_state" not in k}
    finally:
        model.close()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in
               keymap.mcore_to_hf_state_dict(sd, cfg, model_type).items()}
    del sd
    with atomic_files.replacing(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_files.write_json(out / "config.json", hf_cfg, indent=2)
    gen = dict(hf_extra.get("generation_config") or {})
    gen.update({k: hf_cfg[k] for k in keymap.TOKEN_ID_FIELDS if k in hf_cfg and k not in gen})
    atomic_files.write_json(out / "generation_config.json", gen, indent=2)
    tok = header.tokenizer or {}
    if tok.get("type") == "huggingface" and tok.get("path"):
        tok_path = Path(tok["path"])
        tok_src = tok_path if tok_path.is_dir() else tok_path.parent
        copy_tokenizer(tok_src, out, cfg.vocab_size)
    return out
