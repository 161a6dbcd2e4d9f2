"""`minitron data [preprocess.input=[a.jsonl,...] preprocess.output_prefix=P] [data.tokenizer...]`

With inputs: tokenize them into P.bin/P.idx. Without: prepare the demo Shakespeare corpus for
data.tokenizer under data.cache_dir and print its prefix.
"""

from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.data import DataConfig, PreprocessConfig
from megatron_minitron.config.loader import load_config, override_list


def main(overrides: List[str]) -> None:
    from megatron_minitron.data.datasets import prepare_demo_dataset
    from megatron_minitron.data.preprocess import preprocess
    from megatron_minitron.data.tokenizer import build_tokenizer

    cfg = check("data", load_config(override_list(overrides)))
    pre: PreprocessConfig = cfg.preprocess
    data: DataConfig = cfg.data
    tokenizer = build_tokenizer(data.tokenizer)
    print(f"tokenizer: {tokenizer.name}, vocab_size {tokenizer.vocab_size}, eod {tokenizer.eod}")
    if not pre.input:
        prefix = prepare_demo_dataset(tokenizer, data.cache_dir, progress=True)
        print(f"demo corpus: data.paths=[{prefix}]")
        return
    output = cfg.data_output_prefix
    stats = preprocess(pre.input, output, tokenizer, json_key=pre.json_key,
                       append_eod=pre.append_eod)
    print(f"use it with: data.paths=[{stats.output_prefix}] "
          f"model.vocab_size={tokenizer.vocab_size}")
