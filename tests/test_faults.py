"""Faults during extraction and training: kills, a second writer, changed settings, write errors, NaN.

The kill tests run ``lens-extract`` and ``lens-train`` as real subprocesses and stop them with SIGKILL,
then compare what a rerun leaves with an uninterrupted run.
"""

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from zarr.storage import LocalStore

from extract.cli import main as extract_main
from lensio.errors import StoreLockedError
from lensio.lock import LockRecord, acquire_store_lock, lock_name
from lensio.schema import ATTRS_KEY

# 100 sequences of 16 tokens in blocks of 4 sequences: 25 blocks, so a kill lands between many writes.
TOKENS = 1600
BLOCK_SEQUENCES = 4
N_BLOCKS = TOKENS // 16 // BLOCK_SEQUENCES
KILL_SEED = 20261204
KILLS = 3
SUBPROCESS_TIMEOUT_S = 120


def extract_args(model_dir: Path, corpus_dir: Path, out: Path, *extra: str, tokens: int = TOKENS) -> list[str]:
    return ["--model", str(model_dir), "--layers", "all", "--dataset", str(corpus_dir), "--out", str(out),
            "--context", "16", "--tokens", str(tokens), "--batch-size", "4", "--chunk-sequences", "2",
            "--chunks-per-shard", "2", "--quiet", *extra]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def store_arrays(url: Path | str) -> dict[str, np.ndarray]:
    """Every array of a store, by path."""
    group = zarr.open_group(str(url), mode="r")
    return {path: np.asarray(node[...]) for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def store_attrs(url: Path | str) -> dict:
    return dict(zarr.open_group(str(url), mode="r").attrs)[ATTRS_KEY]


def blocks_done(url: Path) -> np.ndarray:
    """The store's progress flags, or an empty array while the store is not created yet."""
    try:
        return np.asarray(zarr.open_group(str(url), mode="r")["progress/done"][:], dtype=bool)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
        return np.zeros(0, dtype=bool)


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes, to show that a rejected command changed nothing."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def output_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def invoke(command, args: list[str]):
    return CliRunner().invoke(command, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> Path:
    """An uninterrupted extraction: what every interrupted run must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "reference.zarr"
    result = invoke(extract_main, extract_args(tiny_gpt2_dir, text_corpus_dir, out))
    assert result.exit_code == 0, result.output
    return out


SMALL_TOKENS = 320  # 20 sequences: 5 blocks


@pytest.fixture(scope="module")
def small_reference_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> Path:
    """An uninterrupted extraction of ``SMALL_TOKENS`` tokens."""
    out = tmp_path_factory.mktemp("small-reference") / "reference.zarr"
    result = invoke(extract_main, extract_args(tiny_gpt2_dir, text_corpus_dir, out, tokens=SMALL_TOKENS))
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------------------------------------------------------
# The store lock


def write_lock(folder: Path, pid: int, hostname: str | None = None, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = LockRecord(pid=pid, hostname=hostname or socket.gethostname(), started="2026-01-01T00:00:00Z",
                        process_start_ticks=None, token="someone-else")
    path = folder / (name or lock_name())
    path.write_text(json.dumps(asdict(record)))
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_held_by_live_process_rejected(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "s.zarr", sleeper.pid)
        with pytest.raises(StoreLockedError) as caught:
            acquire_store_lock(str(tmp_path / "s.zarr"))
    finally:
        sleeper.kill()
        sleeper.wait()
    message = str(caught.value.message)
    assert f"process {sleeper.pid}" in message
    assert str(tmp_path / "s.zarr") in message


def test_lock_left_by_dead_process_taken_over(tmp_path, caplog):
    pid = dead_pid()
    path = write_lock(tmp_path / "s.zarr", pid)
    with acquire_store_lock(str(tmp_path / "s.zarr")) as lock:
        holder = json.loads(path.read_text())["pid"]
        assert holder == os.getpid()
        assert lock.held
    assert "took over the lock" in caplog.text
    assert f"process {pid}" in caplog.text
    assert not path.exists()


def test_lock_from_other_host_rejected(tmp_path):
    write_lock(tmp_path / "s.zarr", dead_pid(), hostname="another-host.example")
    with pytest.raises(StoreLockedError) as caught:
        acquire_store_lock(str(tmp_path / "s.zarr"))
    assert "another-host.example" in caught.value.message
    assert "delete" in caught.value.message


def test_lock_same_shard_twice_rejected(tmp_path):
    url = str(tmp_path / "s.zarr")
    with acquire_store_lock(url, shard_index=0, num_shards=2):
        with acquire_store_lock(url, shard_index=1, num_shards=2) as other:
            assert other.held
            assert (tmp_path / "s.zarr" / ".headlens-lock-1-of-2").is_file()
        with pytest.raises(StoreLockedError):
            acquire_store_lock(url, shard_index=0, num_shards=2)


def test_lock_other_shard_count_rejected(tmp_path):
    url = str(tmp_path / "s.zarr")
    with acquire_store_lock(url):
        with pytest.raises(StoreLockedError) as caught:
            acquire_store_lock(url, shard_index=1, num_shards=2)
    assert "process" in caught.value.message
    assert not (tmp_path / "s.zarr" / ".headlens-lock-1-of-2").exists()


def test_lock_release_keeps_replaced_lock(tmp_path):
    url = str(tmp_path / "s.zarr")
    lock = acquire_store_lock(url)
    path = write_lock(tmp_path / "s.zarr", dead_pid())
    lock.release()
    assert path.is_file()


def test_lock_unreadable_file_waits_then_taken_over(tmp_path):
    folder = tmp_path / "s.zarr"
    folder.mkdir()
    path = folder / lock_name()
    path.write_text("")
    with pytest.raises(StoreLockedError):
        acquire_store_lock(str(folder))
    old = time.time() - 3600
    os.utime(path, (old, old))
    with acquire_store_lock(str(folder)) as lock:
        assert lock.held


def test_lock_not_taken_for_memory_url():
    with acquire_store_lock("memory://faults-test") as lock:
        assert lock.path is None


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL at random points, a second writer, and the stale lock a kill leaves


@dataclass
class InterruptedExtraction:
    """What the killed runs and the final resume did."""

    out: Path
    killed_pids: list[int] = field(default_factory=list)
    killed_while_running: list[bool] = field(default_factory=list)
    blocks_at_kill: list[int] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    second_writer_output: str = ""
    second_writer_exit: int = 0
    writer_pid: int = 0
    final_exit: int = -1
    final_output: str = ""


def wait_for_blocks(out: Path, target: int, process: subprocess.Popen) -> bool:
    """Poll until ``target`` blocks are flagged; False when the process exits first."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while time.monotonic() < deadline:
        if blocks_done(out).sum() >= target:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"lens-extract did not reach {target} blocks in {SUBPROCESS_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir, reference_store) -> InterruptedExtraction:
    """Kill a real lens-extract three times at seeded random points, then resume it in-process.

    During the first run, a second lens-extract on the same store is started in-process; it must be
    rejected while the first one is alive.
    """
    root = tmp_path_factory.mktemp("killed")
    record = InterruptedExtraction(out=root / "killed.zarr")
    args = extract_args(tiny_gpt2_dir, text_corpus_dir, record.out)
    command = [sys.executable, "-c", "from extract.cli import main; main()", *args]
    rng = random.Random(KILL_SEED)
    for attempt in range(KILLS):
        stderr_path = root / f"run{attempt}.stderr"
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=subprocess_env())
        try:
            target = int(blocks_done(record.out).sum()) + rng.randint(1, 5)
            running = wait_for_blocks(record.out, target, process)
            if attempt == 0 and running:
                # SIGSTOP keeps the first writer alive, holding its lock, but unable to finish meanwhile.
                process.send_signal(signal.SIGSTOP)
                second = CliRunner().invoke(extract_main, args)
                process.send_signal(signal.SIGCONT)
                record.second_writer_output, record.second_writer_exit = second.output, second.exit_code
                record.writer_pid = process.pid
            # A random pause on top of the polled progress lands the kill at any point of a block's write.
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            record.killed_while_running.append(process.poll() is None)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=SUBPROCESS_TIMEOUT_S)
        record.killed_pids.append(process.pid)
        record.blocks_at_kill.append(int(blocks_done(record.out).sum()))
        record.stderr.append(stderr_path.read_text())

    final = CliRunner().invoke(extract_main, args)
    record.final_exit, record.final_output = final.exit_code, final.output
    return record


def test_resume_after_kills_matches_uninterrupted(interrupted, reference_store):
    assert interrupted.final_exit == 0, interrupted.final_output
    assert min(interrupted.blocks_at_kill) < N_BLOCKS  # at least one kill left work to resume
    expected = store_arrays(reference_store)
    actual = store_arrays(interrupted.out)
    assert sorted(actual) == sorted(expected)
    for path, values in expected.items():
        np.testing.assert_array_equal(actual[path], values, err_msg=path)
    assert store_attrs(interrupted.out) == store_attrs(reference_store)


def test_second_writer_rejected_while_first_alive(interrupted):
    assert interrupted.writer_pid, "the first run finished before the second writer started"
    assert interrupted.second_writer_exit != 0
    lines = output_lines(interrupted.second_writer_output)
    assert len(lines) == 1, lines
    assert str(interrupted.out) in lines[0]
    assert f"process {interrupted.writer_pid}" in lines[0]
    assert "Traceback" not in interrupted.second_writer_output


def test_lock_left_by_kill_taken_over(interrupted):
    # A run after a killed one starts on the lock file that the killed run left behind.
    later_runs = list(zip(interrupted.killed_pids, interrupted.killed_while_running, interrupted.stderr[1:]))
    checked = [(pid, stderr) for pid, was_running, stderr in later_runs if was_running]
    assert checked
    for previous_pid, stderr in checked:
        assert "took over the lock" in stderr
        assert f"process {previous_pid}" in stderr


def test_no_lock_left_after_finished_run(interrupted):
    assert interrupted.final_exit == 0
    assert not list(interrupted.out.glob(".headlens-lock-*"))


# ---------------------------------------------------------------------------------------------------------------
# Changed settings on resume


@pytest.fixture()
def reference_copy(tmp_path, reference_store) -> Path:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(reference_store, copy)
    return copy


CHANGED_SETTINGS = [
    # (option, new value or a fixture-relative marker, option named in the message)
    ("--model", "LLAMA", "--model"),
    ("--layers", "0", "--layers"),
    ("--context", "8", "--context"),
    ("--dtype", "float32", "--dtype"),
    ("--dataset", "ONE_FILE", "--dataset"),
    ("--seed", "3", "--seed"),
]


def replace_option(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def with_option(args: list[str], option: str, value: str) -> list[str]:
    return replace_option(args, option, value) if option in args else [*args, option, value]


@pytest.mark.parametrize(("option", "value", "named"), CHANGED_SETTINGS, ids=[c[0] for c in CHANGED_SETTINGS])
def test_resume_with_changed_setting_rejected(option, value, named, reference_copy, tiny_gpt2_dir, tiny_llama_dir,
                                              text_corpus_dir):
    value = {"LLAMA": str(tiny_llama_dir), "ONE_FILE": str(text_corpus_dir / "part0.txt")}.get(value, value)
    args = with_option(extract_args(tiny_gpt2_dir, text_corpus_dir, reference_copy), option, value)
    before = folder_snapshot(reference_copy)
    result = invoke(extract_main, args)
    assert result.exit_code != 0
    lines = output_lines(result.output)
    assert len(lines) == 1, lines
    assert f"{named} differs" in lines[0]
    assert "--overwrite" in lines[0]
    assert folder_snapshot(reference_copy) == before


def test_overwrite_starts_afresh(reference_copy, tiny_gpt2_dir, text_corpus_dir):
    args = extract_args(tiny_gpt2_dir, text_corpus_dir, reference_copy, "--overwrite", tokens=320)
    result = invoke(extract_main, [*args, "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    attrs = store_attrs(reference_copy)
    assert attrs["dtype"] == "float32"
    assert attrs["layout"]["n_sequences"] == 20
    assert blocks_done(reference_copy).all()


def test_overwrite_keeps_unrelated_folder(tmp_path, tiny_gpt2_dir, text_corpus_dir):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    result = invoke(extract_main, extract_args(tiny_gpt2_dir, text_corpus_dir, folder, "--overwrite", tokens=160))
    assert result.exit_code != 0
    assert "not a Zarr store" in result.output
    assert (folder / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------
# Disk full and other write errors


class FailingWrites:
    """Make the local store raise ENOSPC on the write of every key under ``prefix`` after ``allowed`` of them."""

    def __init__(self, prefix: str, allowed: int):
        self.prefix, self.allowed, self.count = prefix, allowed, 0

    def install(self, monkeypatch) -> None:
        original = LocalStore.set

        async def failing_set(store, key, value):
            if key.startswith(self.prefix):
                self.count += 1
                if self.count > self.allowed:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
            return await original(store, key, value)

        monkeypatch.setattr(LocalStore, "set", failing_set)


DISK_FULL_CASES = [
    # (keys that fail, writes that succeed first, blocks flagged after the failure)
    ("layers/1/z/c/", 3, [0, 1, 2]),  # activation data of block 3
    ("progress/done/c/", 2, [0, 1]),  # the flag of block 2, after its data
    ("tokens/c/", 0, None),  # creating the store
]


@pytest.mark.parametrize(("prefix", "allowed", "flagged"), DISK_FULL_CASES, ids=["data", "flag", "creation"])
def test_disk_full_stops_and_resumes(prefix, allowed, flagged, tmp_path, monkeypatch, small_reference_store,
                                     tiny_gpt2_dir, text_corpus_dir):
    out = tmp_path / "full.zarr"
    args = extract_args(tiny_gpt2_dir, text_corpus_dir, out, tokens=SMALL_TOKENS)
    with monkeypatch.context() as patch:
        FailingWrites(prefix, allowed).install(patch)
        result = invoke(extract_main, args)
    assert result.exit_code != 0
    lines = output_lines(result.output)
    assert len(lines) == 1, lines
    assert "No space left on device" in lines[0]
    assert str(out) in lines[0]
    assert "rerun" in lines[0]

    done = blocks_done(out)
    assert np.flatnonzero(done).tolist() == (flagged or [])
    expected = store_arrays(small_reference_store)
    if flagged:
        written = store_arrays(out)
        for block in flagged:
            rows = slice(block * BLOCK_SEQUENCES, (block + 1) * BLOCK_SEQUENCES)
            for path in ("layers/0/z", "layers/1/z", "final/normalized", "final/scale"):
                np.testing.assert_array_equal(written[path][rows], expected[path][rows], err_msg=f"{path} {block}")

    resumed = invoke(extract_main, args)
    assert resumed.exit_code == 0, resumed.output
    actual = store_arrays(out)
    for path, values in expected.items():
        np.testing.assert_array_equal(actual[path], values, err_msg=path)


# ---------------------------------------------------------------------------------------------------------------
# NaN, inf and float16 overflow


def model_with_bias(source: Path, target: Path, layer: int, head: int, value: float) -> Path:
    """Copy the tiny GPT-2 with the value-projection bias of one head of one layer set to ``value``."""
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    key = next(name for name in weights if name.endswith(f"h.{layer}.attn.c_attn.bias"))
    bias = weights[key].clone()  # [3 * d_model]: query, key, value
    d_model = bias.shape[0] // 3
    d_head = d_model // 4
    start = 2 * d_model + head * d_head
    bias[start:start + d_head] = value
    weights[key] = bias
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_nan_activation_names_layer_head_sequence(tmp_path, tiny_gpt2_dir, text_corpus_dir):
    model = model_with_bias(tiny_gpt2_dir, tmp_path / "nan-model", layer=1, head=2, value=float("nan"))
    out = tmp_path / "nan.zarr"
    result = invoke(extract_main, extract_args(model, text_corpus_dir, out, tokens=320))
    assert result.exit_code != 0
    lines = output_lines(result.output)
    assert len(lines) == 1, lines
    assert "nan in layer 1, head 2, sequence 0, position 0" in lines[0]
    assert "--dtype" in lines[0]
    assert not blocks_done(out).any()


def test_float16_overflow_suggests_dtype(tmp_path, tiny_gpt2_dir, text_corpus_dir):
    model = model_with_bias(tiny_gpt2_dir, tmp_path / "big-model", layer=0, head=1, value=1e6)
    out = tmp_path / "big.zarr"
    result = invoke(extract_main, extract_args(model, text_corpus_dir, out, tokens=320))
    assert result.exit_code != 0
    lines = output_lines(result.output)
    assert len(lines) == 1, lines
    assert "layer 0, head 1, sequence 0" in lines[0]
    assert "overflows float16" in lines[0]
    assert "--dtype float32" in lines[0]

    retried = invoke(extract_main, extract_args(model, text_corpus_dir, out, "--dtype", "float32", "--overwrite",
                                                tokens=320))
    assert retried.exit_code == 0, retried.output
    assert float(np.abs(store_arrays(out)["layers/0/z"][:, :, 1]).max()) > 65504


# ---------------------------------------------------------------------------------------------------------------
# Training: resume after a kill, and atomic lens saves


CHECKPOINT_KILLER = textwrap.dedent("""
    import os, signal, sys

    import train.fit

    step = int(sys.argv[1])


    class KillAfterCheckpoint(train.fit.ModelCheckpoint):
        def on_validation_end(self, trainer, pl_module):
            super().on_validation_end(trainer, pl_module)
            if trainer.global_step >= step:
                os.kill(os.getpid(), signal.SIGKILL)


    train.fit.ModelCheckpoint = KillAfterCheckpoint

    from train.cli import train_main

    train_main(sys.argv[2:])
""")

# Saves a DLA lens directly (no Lightning import, which takes seconds) and dies half-way through
# writing lens.safetensors.
SAVE_KILLER = textwrap.dedent("""
    import os, signal, sys

    import train.saving
    from lensio.store import open_store
    from train.lenses import DLALens, frozen_parts_from_store

    store_url, layer, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    original = train.saving.save_file


    def save_half_then_die(tensors, path, *args, **kwargs):
        original(tensors, path, *args, **kwargs)
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


    train.saving.save_file = save_half_then_die
    store = open_store(store_url)
    lens = DLALens(frozen_parts_from_store(store, layer))
    train.saving.save_lens(lens, out, train.saving.lens_config(lens, layer=layer, objective="per-head", store=store))
""")


def run_script(tmp_path: Path, source: str, args: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script), *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, cwd=tmp_path)


@pytest.fixture(scope="module")
def training_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("train-store") / "acts.zarr"
    result = invoke(extract_main, extract_args(tiny_gpt2_dir, text_corpus_dir, out, "--dtype", "float32", tokens=640))
    assert result.exit_code == 0, result.output
    return out


def train_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["--store", str(store), "--layer", "1", "--out", str(out), "--batch-tokens", "64", "--val-every", "4",
            "--val-tokens", "64", "--devices", "1", "--quiet", *extra]


TRAIN_STEPS = 12
KILL_STEP = 4


@pytest.fixture(scope="module")
def killed_training(tmp_path_factory, training_store) -> Path:
    """A lens-train run killed right after its checkpoint at step ``KILL_STEP``; returns its folder."""
    from train.fit import checkpoint_dir

    root = tmp_path_factory.mktemp("killed-training")
    args = train_args(training_store, root / "lens", "--lens", "translator", "--max-steps", str(TRAIN_STEPS))
    killed = run_script(root, CHECKPOINT_KILLER, [str(KILL_STEP), *args])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (checkpoint_dir(str(root / "lens")) / "last.ckpt").is_file()
    return root


@pytest.fixture()
def killed_training_copy(tmp_path, killed_training) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(killed_training, copy)
    return copy


def test_training_resumes_from_checkpoint_after_kill(killed_training_copy, monkeypatch, training_store):
    from train.cli import train_main
    from train.fit import checkpoint_dir
    from train.module import LightningLens
    from train.saving import load_lens

    out = killed_training_copy / "lens"
    assert not out.exists()
    steps_run = []
    original_step = LightningLens.training_step

    def counting_step(self, batch, batch_idx):
        steps_run.append(batch_idx)
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(LightningLens, "training_step", counting_step)
    args = train_args(training_store, out, "--lens", "translator", "--max-steps", str(TRAIN_STEPS))
    result = invoke(train_main, args)
    assert result.exit_code == 0, result.output
    assert len(steps_run) == TRAIN_STEPS - KILL_STEP  # continued from the checkpoint, not from step 0
    lens = load_lens(out)
    assert lens.config["metrics"]["steps"] == TRAIN_STEPS
    assert not checkpoint_dir(str(out)).exists()


def test_training_resume_with_other_setting_rejected(killed_training_copy, training_store):
    from train.cli import train_main
    from train.fit import checkpoint_dir

    out = killed_training_copy / "lens"
    checkpoint = checkpoint_dir(str(out)) / "last.ckpt"
    before = checkpoint.read_bytes()
    args = train_args(training_store, out, "--lens", "full", "--max-steps", str(TRAIN_STEPS))
    result = invoke(train_main, args)
    assert result.exit_code != 0
    lines = output_lines(result.output)
    assert len(lines) == 1, lines
    assert "lens is 'translator' there and 'full' in this run" in lines[0]
    assert checkpoint.read_bytes() == before


def test_training_unreadable_checkpoint_starts_afresh(tmp_path, training_store, caplog):
    from train.cli import train_main
    from train.fit import checkpoint_dir
    from train.saving import load_lens

    out = tmp_path / "lens"
    checkpoints = checkpoint_dir(str(out))
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"not a checkpoint")
    result = invoke(train_main, train_args(training_store, out, "--lens", "translator", "--max-steps", "2"))
    assert result.exit_code == 0, result.output
    assert "cannot be read" in caplog.text
    assert load_lens(out).config["metrics"]["steps"] == 2


def test_killed_save_keeps_previous_lens(tmp_path, training_store):
    from train.cli import train_main
    from train.saving import load_lens

    out = tmp_path / "lens"
    args = train_args(training_store, out, "--lens", "dla")
    first = invoke(train_main, args)
    assert first.exit_code == 0, first.output
    before = folder_snapshot(out)

    killed = run_script(tmp_path, SAVE_KILLER, [str(training_store), "1", str(out)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert folder_snapshot(out) == before  # the half-written file went to a staging folder, not into the lens
    assert load_lens(out).kind == "dla"
    staged = list(tmp_path.glob(".lens.tmp-*/lens.safetensors"))
    assert len(staged) == 1  # the killed save's half-written file

    again = invoke(train_main, args)
    assert again.exit_code == 0, again.output
    assert not list(tmp_path.glob(".lens.tmp-*"))
    assert load_lens(out).kind == "dla"

