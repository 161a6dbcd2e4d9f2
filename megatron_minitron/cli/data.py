"""`minitron data [preprocess.input=[a.jsonl,...] preprocess.output_prefix=P] [data.tokenizer...]`

With inputs: tokenize them into P.bin/P.idx. Without: prepare the demo Shakespeare corpus for
data.tokenizer under data.cache_dir and print its prefix.
"""

import dataclasses
from pathlib import Path
from typing import List, Tuple

from omegaconf import OmegaConf

from megatron_minitron.config.data import DataConfig, PreprocessConfig
from megatron_minitron.config.loader import load_config, override_list, to_typed
from megatron_minitron.config.schema import MinitronConfig


def _load(overrides: List[str]) -> Tuple[MinitronConfig, PreprocessConfig]:
    if any(f.name == "preprocess" for f in dataclasses.fields(MinitronConfig)):
        cfg = load_config(overrides)
        return cfg, cfg.preprocess
    # Until schema.py carries `preprocess`, its overrides are parsed here.
    own = [o for o in overrides if o.startswith("preprocess.")]
    cfg = load_config([o for o in overrides if o not in own])
    dotlist = [o[len("preprocess."):] for o in own]
    return cfg, to_typed(OmegaConf.from_dotlist(dotlist), PreprocessConfig)


def main(overrides: List[str]) -> None:
    from megatron_minitron.data.datasets import prepare_demo_dataset
    from megatron_minitron.data.preprocess import preprocess
    from megatron_minitron.data.tokenizer import build_tokenizer

    cfg, pre = _load(override_list(overrides))
    data: DataConfig = cfg.data
    tokenizer = build_tokenizer(data.tokenizer)
    print(f"tokenizer: {tokenizer.name}, vocab_size {tokenizer.vocab_size}, eod {tokenizer.eod}")
    if not pre.input:
        prefix = prepare_demo_dataset(tokenizer, data.cache_dir, progress=True)
        print(f"demo corpus: data.paths=[{prefix}]")
        return
    output = pre.output_prefix or str(Path(cfg.run.dir) / "data" / "text_document")
    stats = preprocess(pre.input, output, tokenizer, json_key=pre.json_key,
                       append_eod=pre.append_eod)
    print(f"use it with: data.paths=[{stats.output_prefix}] "
          f"model.vocab_size={tokenizer.vocab_size}")
