"""Scale-out: sharded extraction by several processes into one store, and distributed training.

The two multi-process tests run real processes. In one, ``lens-extract`` shards write one store at
the same time, and one of them is killed and rerun. In the other, ``lens-train --devices 2 --strategy
ddp`` runs on the CPU: Lightning starts a second process and connects the two with the gloo backend.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import load_file

from extract.cli import main as extract_main
from extract.config import ExtractConfig, resolve_shards
from extract.loop import shard_blocks
from lensio import writer
from lensio.errors import BadInputError
from lensio.reader import RECORD_BATCHES_ENV, LayerBatches, split_batches, split_ranges
from lensio.store import open_store
from tests.helpers_pipeline import CONTEXT, extract_store
from train.config import TrainConfig
from train.fit import lightning_strategy
from train.fit import run as train_run

SUBPROCESS_TIMEOUT_S = 300
LAYER = 1


def subprocess_env(**extra: str) -> dict[str, str]:
    """Return the test's environment without launcher variables, which a child would take its shard or rank from."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def store_arrays(url: str | Path) -> dict[str, np.ndarray]:
    """Every array of a store, by path."""
    group = zarr.open_group(str(url), mode="r")
    return {path: np.asarray(node[...]) for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def assert_same_store(actual: str | Path, expected: str | Path) -> None:
    expected_arrays = store_arrays(expected)
    actual_arrays = store_arrays(actual)
    assert sorted(actual_arrays) == sorted(expected_arrays)
    for path, values in expected_arrays.items():
        np.testing.assert_array_equal(actual_arrays[path], values, err_msg=path)
    assert open_store(str(actual)).meta == open_store(str(expected)).meta


# ---------------------------------------------------------------------------------------------------------------
# Shard assignment and options


@pytest.mark.parametrize(("n_blocks", "num_shards"), [(5, 2), (5, 5), (3, 4), (1, 3), (100, 7), (8, 1)])
def test_shard_blocks_partition_contiguously(n_blocks, num_shards):
    ranges = [shard_blocks(n_blocks, num_shards, index) for index in range(num_shards)]
    owned = [block for blocks in ranges for block in blocks]
    sizes = [len(blocks) for blocks in ranges]

    assert owned == list(range(n_blocks))  # disjoint, complete and in shard order
    assert max(sizes) - min(sizes) <= 1


def test_shard_blocks_known_split():
    assert [list(shard_blocks(5, 2, index)) for index in range(2)] == [[0, 1], [2, 3, 4]]


@pytest.mark.parametrize(("num_shards", "shard_index", "environ", "expected"), [
    (None, None, {}, (1, 0)),
    (4, 2, {}, (4, 2)),
    (4, 2, {"WORLD_SIZE": "8", "RANK": "5"}, (4, 2)),
    (None, None, {"WORLD_SIZE": "8", "RANK": "5"}, (8, 5)),
    (None, None, {"WORLD_SIZE": "8"}, (1, 0)),
])
def test_resolve_shards_sources(num_shards, shard_index, environ, expected):
    assert resolve_shards(num_shards, shard_index, environ) == expected


@pytest.mark.parametrize(("num_shards", "shard_index", "environ", "message"), [
    (4, None, {}, "--num-shards 4 needs --shard-index"),
    (None, 1, {}, "--shard-index 1 needs --num-shards"),
    (None, None, {"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
    (None, None, {"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not an integer"),
])
def test_resolve_shards_rejects(num_shards, shard_index, environ, message):
    with pytest.raises(BadInputError) as caught:
        resolve_shards(num_shards, shard_index, environ)

    assert message in caught.value.message


@pytest.mark.parametrize(("options", "message"), [
    ({"num_shards": 0}, "--num-shards must be positive, got 0"),
    ({"num_shards": 2, "shard_index": 2}, "--shard-index 2 must be between 0 and --num-shards - 1 (1)"),
    ({"num_shards": 2, "shard_index": -1}, "--shard-index -1 must be between 0"),
    ({"num_shards": 2, "shard_index": 1, "overwrite": True}, "--overwrite cannot be combined with --num-shards 2"),
])
def test_extract_config_rejects_shards(options, message):
    with pytest.raises(BadInputError) as caught:
        ExtractConfig(model="gpt2", layers="0", dataset="texts", **options)

    assert message in caught.value.message


def test_extract_cli_rejects_index_without_count(tmp_path, tiny_gpt2_dir, text_corpus_dir):
    result = CliRunner().invoke(extract_main, ["--model", str(tiny_gpt2_dir), "--layers", "0", "--dataset",
                                               str(text_corpus_dir), "--out", str(tmp_path / "s.zarr"),
                                               "--shard-index", "1", "--quiet"])

    assert result.exit_code == 2
    assert "--shard-index 1 needs --num-shards" in result.output
    assert not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------------------------------------------------------
# The reader's split between ranks


@pytest.fixture(scope="module")
def reader_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> str:
    """A real 40-sequence store in 10 chunks of 4 sequences; the training range is 38 sequences."""
    return extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir)


def positions_of(batches) -> list[tuple[int, int]]:
    pairs = []
    for batch in batches:
        pairs.extend(zip(batch.sequence.tolist(), batch.position.tolist()))
    return pairs


def all_positions(start: int, end: int, last_position_only: bool = False) -> list[tuple[int, int]]:
    positions = [CONTEXT - 1] if last_position_only else range(CONTEXT)
    return [(seq, pos) for seq in range(start, end) for pos in positions]


READER_CASES = [
    # world_size, sequences, batch_tokens, last_position_only
    (2, (0, 38), 64, False),
    (2, (0, 38), 100, False),
    (2, (0, 38), 300, False),
    (3, (0, 38), 64, False),
    (3, (0, 38), 1000, False),
    (4, (5, 23), 24, False),
    (2, (0, 38), 5, True),
    (2, (38, 40), 64, False),
    (2, (38, 40), 4, False),
]


@pytest.mark.parametrize(("world_size", "sequences", "batch_tokens", "last_position_only"), READER_CASES)
def test_ranks_yield_equal_batch_counts(reader_store, world_size, sequences, batch_tokens, last_position_only):
    ranks = [LayerBatches(reader_store, 0, sequences, batch_tokens, shuffle=True, seed=4, rank=rank,
                          world_size=world_size, last_position_only=last_position_only) for rank in range(world_size)]

    for epoch in range(2):
        batches = [list(dataset) for dataset in ranks]
        counts = [len(rank_batches) for rank_batches in batches]
        sizes = [len(batch) for rank_batches in batches for batch in rank_batches]
        seen = Counter(pair for rank_batches in batches for pair in positions_of(rank_batches))

        assert len(set(counts)) == 1, counts
        assert counts[0] == ranks[0].batches_per_epoch(epoch)
        assert max(sizes) <= batch_tokens
        assert min(sizes) >= 1
        assert max(seen.values()) == 1
        assert sorted(seen) == all_positions(*sequences, last_position_only)


@pytest.mark.parametrize(("world_size", "num_workers", "sequences", "batch_tokens", "max_tokens"), [
    (2, 2, (0, 38), 64, None),
    (2, 3, (0, 38), 100, None),
    (3, 2, (0, 38), 32, None),
    (2, 2, (38, 40), 8, None),
    (2, 2, (0, 38), 16, 100),
])
def test_plan_with_workers_equal_counts(reader_store, world_size, num_workers, sequences, batch_tokens, max_tokens):
    dataset = LayerBatches(reader_store, 0, sequences, batch_tokens, shuffle=True, seed=1, world_size=world_size,
                           max_tokens=max_tokens)

    plan = dataset.plan_epoch(0, num_workers)
    counts = [sum(len(plan[rank, worker].batch_sizes) for worker in range(num_workers)) for rank in range(world_size)]
    sequences_read = Counter(seq for share in plan.values() for start, end in share.ranges for seq in range(start, end))

    assert len(set(counts)) == 1, counts
    assert max(sequences_read.values()) == 1
    assert sorted(sequences_read) == list(range(*sequences))
    for share in plan.values():
        available = sum(end - start for start, end in share.ranges) * CONTEXT
        assert sum(share.batch_sizes) <= available
        assert all(1 <= size <= batch_tokens for size in share.batch_sizes)


def test_plan_max_tokens_caps_each_share(reader_store):
    dataset = LayerBatches(reader_store, 0, (0, 38), 16, shuffle=True, world_size=2, max_tokens=100)

    plan = dataset.plan_epoch(0, num_workers=2)

    assert sorted(sum(share.batch_sizes) for share in plan.values()) == [25, 25, 25, 25]


def test_small_range_split_between_ranks(reader_store):
    # The held-out range (38, 40) is one chunk; each of two ranks gets one of its sequences.
    shares = [positions_of(LayerBatches(reader_store, 0, (38, 40), 64, shuffle=False, rank=rank, world_size=2))
              for rank in range(2)]

    assert shares == [all_positions(38, 39), all_positions(39, 40)]


def test_rank_without_sequences_rejected(reader_store):
    dataset = LayerBatches(reader_store, 0, (38, 40), 64, rank=0, world_size=3)

    with pytest.raises(BadInputError) as caught:
        next(iter(dataset))

    assert "give rank 2 only 0 positions" in caught.value.message
    assert "each of the 3 ranks must yield 1 batch per epoch" in caught.value.message


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_reader_rank_out_of_range_rejected(reader_store, rank, world_size):
    with pytest.raises(BadInputError) as caught:
        LayerBatches(reader_store, 0, (0, 38), 64, rank=rank, world_size=world_size)

    assert f"rank {rank} is out of range for world size {world_size}" in caught.value.message


@pytest.mark.parametrize(("sizes", "count", "expected"), [
    ([64, 64, 32], 3, [64, 64, 32]),
    ([64, 64, 32], 4, [64, 32, 32, 32]),
    ([64, 64, 32], 5, [32, 32, 32, 32, 32]),
    ([5], 3, [2, 1, 2]),
    ([1, 1], 2, [1, 1]),
])
def test_split_batches_cases(sizes, count, expected):
    assert split_batches(sizes, count) == expected


def test_split_batches_too_few_positions():
    with pytest.raises(ValueError) as caught:
        split_batches([1, 1], 3)

    assert "cannot split 2 positions into 3 batches" in str(caught.value)


@pytest.mark.parametrize(("ranges", "min_count", "expected"), [
    ([(0, 4), (4, 8)], 2, [(0, 4), (4, 8)]),
    ([(0, 4)], 2, [(0, 2), (2, 4)]),
    ([(0, 4)], 3, [(0, 1), (1, 2), (2, 4)]),
    ([(38, 40)], 4, [(38, 39), (39, 40)]),
    ([(0, 3), (3, 4)], 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    ([(0, 1), (1, 5)], 4, [(0, 1), (1, 2), (2, 3), (3, 5)]),
    ([(0, 8), (8, 10)], 5, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]),
    ([], 2, []),
])
def test_split_ranges_cases(ranges, min_count, expected):
    assert split_ranges(ranges, min_count) == expected


def test_record_batches_env(reader_store, tmp_path, monkeypatch):
    monkeypatch.setenv(RECORD_BATCHES_ENV, str(tmp_path / "record"))
    dataset = LayerBatches(reader_store, 0, (0, 38), 100, shuffle=True, seed=2, rank=1, world_size=2)

    batches = list(dataset)
    lines = (tmp_path / "record" / "batches-rank1-worker0.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]

    assert len(entries) == len(batches)
    assert entries[0]["sequences"] == [0, 38]
    assert entries[0]["epoch"] == 0
    assert entries[0]["rank"] == 1
    assert entries[0]["sequence"] == batches[0].sequence.tolist()
    assert entries[-1]["position"] == batches[-1].position.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Two processes extracting into one store

SHARD_TOKENS = 320  # 20 sequences in blocks of 4: shard 0 of 2 writes blocks 0-1, shard 1 blocks 2-4
KILL_BLOCK = 3

# Runs lens-extract, but SIGKILLs the process after block KILL_BLOCK's data is stored and before its
# progress flag is set: the worst moment, whose data the rerun must write again.
KILL_SCRIPT = textwrap.dedent("""
    import os, signal
    import lensio.writer as writer

    original = writer.write_block

    def write_then_die(store, block, arrays):
        if block == int(os.environ["HEADLENS_TEST_KILL_BLOCK"]):
            start, end = store.layout.block_range(block)
            for path, data in arrays.items():
                store.group[path][start:end] = data
            os.kill(os.getpid(), signal.SIGKILL)
        original(store, block, arrays)

    writer.write_block = write_then_die
    from extract.cli import main
    main()
""")


def shard_args(model_dir: Path, corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--layers", "all", "--dataset", str(corpus_dir), "--out", str(out),
            "--context", str(CONTEXT), "--tokens", str(SHARD_TOKENS), "--batch-size", "2", "--chunk-sequences", "2",
            "--chunks-per-shard", "2", "--dtype", "float32", "--quiet", *extra]


def start_extract(args: list[str], stderr_path: Path, script: str = "from extract.cli import main; main()",
                  **env: str) -> subprocess.Popen:
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=stderr,
                                text=True, env=subprocess_env(**env))


@pytest.fixture(scope="module")
def single_process_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("single") / "single.zarr"
    result = CliRunner().invoke(extract_main, shard_args(tiny_gpt2_dir, text_corpus_dir, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def concurrent_shards(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> dict:
    """Shard 0 in a subprocess and shard 1 in this process, writing one store at the same time.

    Shard 1 starts first and waits for shard 0 to create the store, so both start writing at about the same time.
    """
    root = tmp_path_factory.mktemp("concurrent")
    out = root / "sharded.zarr"
    args = shard_args(tiny_gpt2_dir, text_corpus_dir, out)
    process = start_extract([*args, "--num-shards", "2", "--shard-index", "0"], root / "shard0.stderr")
    try:
        with pytest.MonkeyPatch.context() as patch:
            # Without shard 0 the in-process shard would wait for the default 30 minutes.
            patch.setattr(writer, "JOIN_TIMEOUT_S", SUBPROCESS_TIMEOUT_S)
            joined = CliRunner().invoke(extract_main, [*args, "--num-shards", "2", "--shard-index", "1"])
        stdout, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        process.kill()
    return {"out": out, "exit_code": process.returncode, "stdout": stdout,
            "stderr": (root / "shard0.stderr").read_text(), "joined": joined}


def test_concurrent_shards_exit_cleanly(concurrent_shards):
    assert concurrent_shards["exit_code"] == 0, concurrent_shards["stderr"]
    assert concurrent_shards["joined"].exit_code == 0, concurrent_shards["joined"].output


def test_concurrent_shards_match_single_process(concurrent_shards, single_process_store):
    assert_same_store(concurrent_shards["out"], single_process_store)


def test_concurrent_shards_report_own_tokens(concurrent_shards):
    # Shard 0 writes blocks 0-1 (8 sequences), shard 1 blocks 2-4 (12 sequences).
    assert f"shard 0 of 2: store {concurrent_shards['out']}: 20 sequences; wrote {8 * CONTEXT} tokens" in \
        concurrent_shards["stdout"]
    assert f"shard 1 of 2: store {concurrent_shards['out']}: 20 sequences; wrote {12 * CONTEXT} tokens" in \
        concurrent_shards["joined"].output


def test_concurrent_shards_store_complete(concurrent_shards):
    store = open_store(str(concurrent_shards["out"]))

    assert store.complete is True
    assert store.n_written == 20
    assert not list(Path(concurrent_shards["out"]).glob(".headlens-lock-*"))


@pytest.fixture(scope="module")
def killed_shard(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> dict:
    """Shard 1 in a subprocess killed in its second block; shard 0 in this process; then shard 1 rerun here."""
    root = tmp_path_factory.mktemp("killed-shard")
    out = root / "sharded.zarr"
    args = shard_args(tiny_gpt2_dir, text_corpus_dir, out)
    shard1 = [*args, "--num-shards", "2", "--shard-index", "1"]
    process = start_extract(shard1, root / "shard1.stderr", KILL_SCRIPT, HEADLENS_TEST_KILL_BLOCK=str(KILL_BLOCK))
    try:
        shard0 = CliRunner().invoke(extract_main, [*args, "--num-shards", "2", "--shard-index", "0"])
        process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        process.kill()
    store = open_store(str(out))
    state = {"done": store.blocks_done.tolist(), "complete": store.complete}
    rerun = CliRunner().invoke(extract_main, shard1)
    return {"out": out, "exit_code": process.returncode, "stderr": (root / "shard1.stderr").read_text(),
            "shard0": shard0, "after_kill": state, "rerun": rerun}


def test_shard_waits_for_unfinished_creation(single_process_store, tmp_path, tiny_gpt2_dir, text_corpus_dir,
                                             monkeypatch):
    # A store of the same run without progress/done looks like one that shard 0 is still creating.
    out = tmp_path / "creating.zarr"
    shutil.copytree(single_process_store, out)
    shutil.rmtree(out / "progress")
    monkeypatch.setattr(writer, "JOIN_TIMEOUT_S", 0.3)
    monkeypatch.setattr(writer, "JOIN_POLL_S", 0.05)

    result = CliRunner().invoke(extract_main, [*shard_args(tiny_gpt2_dir, text_corpus_dir, out), "--num-shards", "2",
                                               "--shard-index", "1"])

    assert result.exit_code == 2
    assert f"store {str(out)!r} was not created within 0.3 s; shard 0 creates it" in result.output
    assert not (out / "progress").exists()  # shard 1 neither created nor recreated the store
    assert_same_arrays_except_progress(out, single_process_store)


def assert_same_arrays_except_progress(actual: Path, expected: Path) -> None:
    expected_arrays = {path: values for path, values in store_arrays(expected).items() if path != "progress/done"}
    actual_arrays = store_arrays(actual)
    assert sorted(actual_arrays) == sorted(expected_arrays)
    for path, values in expected_arrays.items():
        np.testing.assert_array_equal(actual_arrays[path], values, err_msg=path)


def test_killed_shard_left_store_incomplete(killed_shard):
    assert killed_shard["shard0"].exit_code == 0, killed_shard["shard0"].output
    assert killed_shard["exit_code"] == -signal.SIGKILL, killed_shard["stderr"]
    assert killed_shard["after_kill"]["done"] == [True, True, True, False, False]
    assert killed_shard["after_kill"]["complete"] is False


def test_killed_shard_rerun_completes_store(killed_shard, single_process_store):
    assert killed_shard["rerun"].exit_code == 0, killed_shard["rerun"].output
    assert "20 of 20 sequences written, complete" in killed_shard["rerun"].output
    assert_same_store(killed_shard["out"], single_process_store)


# ---------------------------------------------------------------------------------------------------------------
# Two processes training one lens with DDP

# 42 sequences: the last 2 are held out, and the 40 training sequences are 10 chunks of 4, so each of
# two ranks reads 5 chunks (320 positions). A batch of 320 positions per rank is one step per epoch,
# whose gradient, averaged by DDP, equals the single-process gradient over all 640 positions.
DDP_TOKENS = 42 * CONTEXT
DDP_TRAIN_SEQUENCES = 40
DDP_STEPS = 4
# Adam moves each weight by up to lr = 1e-3 per step, 4e-3 in all. The two runs differ only in float32
# rounding, because DDP averages two half-batch gradients. The weights were about 6e-8 apart when this
# test was written, but Adam can amplify rounding where a gradient is near 0. The tolerance, 1e-5, is
# 1/400 of the largest movement.
LENS_MATCH_ATOL = 1e-5


def test_ddp_strategy_skips_buffer_broadcast():
    strategy = lightning_strategy("ddp")

    assert isinstance(strategy, DDPStrategy)
    assert False in (strategy._ddp_kwargs.get("forward_sync_buffers"), strategy._ddp_kwargs.get("broadcast_buffers"))


@pytest.mark.parametrize("name", ["auto", "ddp_spawn", "deepspeed"])
def test_other_strategies_pass_through(name):
    assert lightning_strategy(name) == name


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP is accepted where CUDA is available")
def test_fsdp_without_cuda_rejected():
    with pytest.raises(BadInputError) as caught:
        lightning_strategy("fsdp")

    assert "--strategy fsdp needs CUDA GPUs and none is available; use --strategy ddp" in caught.value.message


@pytest.fixture(scope="module")
def ddp_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> str:
    return extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir, tokens=DDP_TOKENS)


def train_args(store: str, out: Path, batch_tokens: int) -> list[str]:
    return ["--store", store, "--layer", str(LAYER), "--lens", "translator", "--out", str(out),
            "--batch-tokens", str(batch_tokens), "--max-steps", str(DDP_STEPS), "--val-every", str(DDP_STEPS),
            "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, ddp_store) -> dict:
    """``lens-train --devices 2 --strategy ddp`` with every rank recording the positions of its batches."""
    root = tmp_path_factory.mktemp("ddp")
    script = Path(sys.executable).parent / "lens-train"
    command = [sys.executable, str(script), *train_args(ddp_store, root / "lens", 320), "--devices", "2",
               "--strategy", "ddp"]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                            env=subprocess_env(**{RECORD_BATCHES_ENV: str(root / "record")}), check=False)
    entries = []
    for path in sorted((root / "record").glob("batches-rank*.jsonl")):
        entries.extend(json.loads(line) for line in path.read_text().splitlines())
    return {"result": result, "lens": root / "lens", "entries": entries}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, ddp_store) -> Path:
    """The same training in this process on one device, with each batch the size of both ranks' batches."""
    out = tmp_path_factory.mktemp("single-train") / "lens"
    train_run(TrainConfig(store=ddp_store, layer=LAYER, lenses=("translator",), out=str(out), batch_tokens=640,
                          max_steps=DDP_STEPS, val_every=DDP_STEPS, seed=3, devices=1, progress=False))
    return out


def test_ddp_run_succeeds(ddp_run):
    result = ddp_run["result"]

    assert result.returncode == 0, result.stderr[-4000:]
    assert (ddp_run["lens"] / "lens.safetensors").is_file()


def test_ddp_ranks_see_each_sequence_once_per_epoch(ddp_run):
    train = [entry for entry in ddp_run["entries"] if entry["sequences"] == [0, DDP_TRAIN_SEQUENCES]]
    by_epoch: dict[int, Counter] = defaultdict(Counter)
    batches: dict[tuple[int, int], int] = Counter()
    for entry in train:
        by_epoch[entry["epoch"]].update(zip(entry["sequence"], entry["position"]))
        batches[entry["epoch"], entry["rank"]] += 1

    assert sorted(by_epoch) == list(range(DDP_STEPS))
    assert {rank for _, rank in batches} == {0, 1}
    for epoch, seen in by_epoch.items():
        assert max(seen.values()) == 1, f"epoch {epoch}"
        assert sorted(seen) == all_positions(0, DDP_TRAIN_SEQUENCES), f"epoch {epoch}"
        assert batches[epoch, 0] == batches[epoch, 1], f"epoch {epoch}"


def test_ddp_ranks_read_disjoint_chunks(ddp_run):
    train = [entry for entry in ddp_run["entries"] if entry["sequences"] == [0, DDP_TRAIN_SEQUENCES]]
    sequences = {rank: {seq for entry in train if entry["rank"] == rank and entry["epoch"] == 0
                        for seq in entry["sequence"]} for rank in (0, 1)}

    assert len(sequences[0]) == DDP_TRAIN_SEQUENCES // 2
    assert not sequences[0] & sequences[1]


def test_ddp_lens_matches_single_process(ddp_run, single_run):
    assert ddp_run["result"].returncode == 0, ddp_run["result"].stderr[-4000:]
    ddp = load_file(str(ddp_run["lens"] / "lens.safetensors"))
    single = load_file(str(single_run / "lens.safetensors"))
    identity = torch.eye(ddp["weight"].shape[-1]).expand_as(ddp["weight"])

    assert sorted(ddp) == sorted(single)
    # Training moved the lens by much more than the tolerance, so a match is not just two untrained lenses.
    assert (single["weight"] - identity).abs().max() > 10 * LENS_MATCH_ATOL
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=LENS_MATCH_ATOL, rtol=0, msg=name)


def test_ddp_lens_config_records_steps(ddp_run):
    config = json.loads((ddp_run["lens"] / "config.json").read_text())

    assert config["metrics"]["steps"] == DDP_STEPS
    assert config["training"]["batch_tokens"] == 320
