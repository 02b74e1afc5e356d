"""Data-parallel training: each process's shard of every epoch, and real torchrun groups of two CPU processes (gloo)
that must train like one process with the same global batch, write files from rank 0 only, survive a killed
process under --max-restarts, and all fail when one fails. Every group runs under a timeout, so that a
regression fails the test instead of hanging it."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import REPO, make_image_folder
from imgrec.data.info import ArraySplit
from imgrec.data.loaders import StreamLoader, TensorLoader, make_loader, shard_indices, shard_size
from imgrec.data.transforms import BatchTransform
from imgrec.engine import distributed
from imgrec.engine.checkpoint import load_weights_file
from imgrec.engine.runs import find_run
from imgrec.engine.state import check_world_size, load_state
from imgrec.errors import UsageError

GROUP_TIMEOUT = 240  # seconds for one torchrun group on a busy 2-core machine; a hang fails the test
FAULTS = REPO / "tests" / "ddp_faults.py"
PLAIN = BatchTransform([0.5] * 3, [0.25] * 3)
# Three epochs of an MLP without dropout or augmentation: what the processes learn depends only on the batches.
TRAIN = ["--model", "mlp", "--epochs", "3", "--augment", "none", "--lr", "2e-3", "--threads", "1", "--workers", "0",
         "--device", "cpu", "--dist-timeout", "2", "--precision", "fp32"]  # fp32: the equivalence is float tolerance
PER_PROCESS_BATCH = 4


# --- each process's part of an epoch -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), world_size=st.integers(1, 8), pad=st.booleans())
def test_shards_are_disjoint_cover_the_order_and_have_equal_lengths_when_padded(n: int, world_size: int,
                                                                                pad: bool) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    parts = [shard_indices(order, rank, world_size, pad) for rank in range(world_size)]
    assert [len(p) for p in parts] == [shard_size(n, rank, world_size, pad) for rank in range(world_size)]
    together = torch.cat(parts).tolist()
    assert set(together) == set(order.tolist())  # every index is somewhere
    if pad:
        assert len({len(p) for p in parts}) == 1  # every process runs the same number of steps
        assert len(together) - n == (-n) % world_size  # the only repeats are the padding
    else:
        assert sorted(together) == sorted(order.tolist())  # evaluation: each index exactly once


def _arrays(n: int) -> ArraySplit:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ArraySplit(images, torch.arange(n) % 3)


def _labels_of_epoch(loader: TensorLoader | StreamLoader, epoch: int) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [(x[:, 0, 0, 0] * 0.25 + 0.5).mul(255).round().long().tolist() for x, _ in loader]  # image ids


def test_the_processes_batches_at_each_step_make_the_single_process_batch() -> None:
    data = _arrays(48)
    single = TensorLoader(data, 8, PLAIN, shuffle=True, seed=3)
    shards = [TensorLoader(data, 4, PLAIN, shuffle=True, seed=3, shard=(rank, 2)) for rank in range(2)]
    for epoch in (1, 2):
        whole = _labels_of_epoch(single, epoch)
        parts = [_labels_of_epoch(loader, epoch) for loader in shards]
        assert len(parts[0]) == len(parts[1]) == len(whole) == 6
        for step, batch in enumerate(whole):
            assert sorted(parts[0][step] + parts[1][step]) == sorted(batch)
    assert _labels_of_epoch(single, 1) != _labels_of_epoch(single, 2)  # reshuffled every epoch


def test_both_loaders_give_a_process_the_same_shard(tmp_path: Path) -> None:
    from imgrec.data.datasets import DataOptions, load_data

    folder = make_image_folder(tmp_path / "photos", per_class=7, size=8)
    bundle = load_data(str(folder), DataOptions(str(tmp_path), str(tmp_path / "cache"), loader="memory", workers=0))
    files = load_data(str(folder), DataOptions(str(tmp_path), str(tmp_path / "cache"), loader="stream", workers=0))
    transform = BatchTransform(bundle.info.mean, bundle.info.std)
    for rank in range(3):
        memory = make_loader(bundle.train, 2, transform, train=True, seed=5, shard=(rank, 3))
        stream = make_loader(files.train, 2, transform, train=True, seed=5, workers=0, shard=(rank, 3))
        assert isinstance(memory, TensorLoader) and isinstance(stream, StreamLoader)
        memory.set_epoch(2)
        stream.set_epoch(2)
        for (xa, ya), (xb, yb) in zip(memory, stream, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_every_process_gets_as_many_training_steps_and_no_evaluation_image_twice() -> None:
    data = _arrays(11)
    train = [make_loader(data, 2, PLAIN, train=True, shard=(r, 3)) for r in range(3)]
    assert {len(loader) for loader in train} == {2}  # ceil(11 / 3) = 4 images each, padded with one repeat
    evaluation = [make_loader(data, 2, PLAIN, train=False, shard=(r, 3)) for r in range(3)]
    seen = sorted(i for loader in evaluation for batch in _labels_of_epoch(loader, 1) for i in batch)
    assert seen == list(range(11))


def test_a_process_resumes_its_shard_at_the_next_batch_and_refuses_another_processes_state() -> None:
    data = _arrays(40)
    loader = TensorLoader(data, 4, PLAIN, shuffle=True, seed=1, shard=(1, 2))
    full = _labels_of_epoch(loader, 3)
    loader.set_epoch(3)
    it = iter(loader)
    first = [next(it), next(it)]
    assert len(first) == 2
    saved = loader.state_dict()
    assert saved["batches_done"] == 2 and (saved["rank"], saved["world_size"]) == (1, 2)
    fresh = TensorLoader(data, 4, PLAIN, shuffle=True, seed=1, shard=(1, 2))
    fresh.load_state_dict(saved)
    assert [(x[:, 0, 0, 0] * 0.25 + 0.5).mul(255).round().long().tolist() for x, _ in fresh] == full[2:]
    with pytest.raises(ValueError, match="process 1 of 2"):
        TensorLoader(data, 4, PLAIN, shuffle=True, seed=1, shard=(0, 2)).load_state_dict(saved)


# --- the helpers in a single process -------------------------------------------------------------------------------

def test_without_torchrun_every_helper_is_the_single_process_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    here = distributed.setup(1.0)
    assert (here.rank, here.world_size, here.distributed, here.is_main) == (0, 1, False, True)
    assert distributed.sum_over_processes(1.5, 2, 3) == [1.5, 2, 3]
    assert distributed.agree(True, False) == (True, False)
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    assert distributed.from_main(lambda: 42) == 42
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model, sync_bn=True) is model


def test_sync_bn_conversion_keeps_the_state_dict_keys() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(4)))
    keys = list(model.state_dict())
    assert distributed.convert_sync_bn(model) == 2
    assert list(model.state_dict()) == keys


def test_a_restarted_group_finds_the_newest_folder_of_its_config(tmp_path: Path) -> None:
    import yaml

    for name, seed in (("digits-mlp", 0), ("digits-mlp2", 1), ("digits-mlp3", 0), ("digits-mlpx", 0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"name": None, "seed": seed, "exist_ok": False}))
        time.sleep(0.01)
    assert find_run(tmp_path, "digits-mlp", {"name": None, "seed": 0, "exist_ok": False}) == tmp_path / "digits-mlp3"
    assert find_run(tmp_path, "digits-mlp", {"name": None, "seed": 1, "exist_ok": False}) == tmp_path / "digits-mlp2"
    assert find_run(tmp_path, "digits-mlp", {"name": None, "seed": 2, "exist_ok": False}) is None


EXIT_SCRIPT = """
import atexit, sys
from imgrec.engine import distributed
atexit.register(lambda: print(" and the interpreter shut down"))
distributed._joined = {joined}  # what setup records when this process joins a group
print("said before the end", end="")  # a pipe: block-buffered, lost unless flushed
sys.stderr.write("and on stderr")
raise SystemExit(distributed.end_process(3))
"""


@pytest.mark.parametrize("joined", [True, False])
def test_a_process_that_joined_a_group_exits_before_the_interpreters_shutdown(joined: bool) -> None:
    # In a group, gloo's worker threads may still be releasing the last collective's tensors (which takes the
    # GIL) while the interpreter shuts down: torch then aborts the process and the group fails.
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT.format(joined=joined)], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]  # the command's own exit code, either way
    assert done.stdout == ("said before the end" if joined else "said before the end and the interpreter shut down\n")
    assert done.stderr.endswith("and on stderr")


def _a_bug(args: Any) -> int:
    raise RuntimeError("a bug in the command")


def _a_usage_error(args: Any) -> int:
    raise UsageError("a mistake of the user's")


def test_in_a_group_the_cli_ends_every_outcome_through_end_process(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from imgrec import cli

    monkeypatch.setitem(cli.COMMANDS, "models", _a_bug)
    with pytest.raises(RuntimeError, match="a bug"):  # outside a group: Python's own report and exit
        cli.main(["models"])
    ended: list[int] = []
    monkeypatch.setattr(distributed, "_joined", True)
    monkeypatch.setattr(distributed, "end_process", lambda code: ended.append(code) or code)
    assert cli.main(["models"]) == 1  # the traceback printed, then the group's way out
    assert "RuntimeError: a bug in the command" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "models", lambda args: 0)
    assert cli.main(["models"]) == 0
    monkeypatch.setitem(cli.COMMANDS, "models", _a_usage_error)
    assert cli.main(["--verbose", "models"]) == 2  # --verbose shows the traceback, and still ends the group's way
    err = capsys.readouterr().err
    assert "Traceback" in err and "imgrec models: error: a mistake of the user's" in err
    assert ended == [1, 0, 2]
    monkeypatch.setattr(distributed, "_joined", False)
    with pytest.raises(UsageError, match="a mistake"):  # outside a group --verbose lets Python report it
        cli.main(["--verbose", "models"])


# --- real groups of two processes ----------------------------------------------------------------------------------

def test_every_train_flag_but_log_passes_through_torchruns_own_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun refuses, anywhere on its command line, a flag that shortens two of its own (Python's argparse): --log
    could be its --log-dir or --logs-specs. Its second name, --logger, passes; so must every other flag of train."""
    from torch.distributed.run import parse_args

    from imgrec.cli import _subparsers, build_parser

    train = _subparsers(build_parser()).choices["train"]
    flags = sorted({o for a in train._actions for o in a.option_strings if o.startswith("--")} - {"--help"})
    assert "--logger" in flags
    refused = []
    for flag in flags:
        try:
            parsed = parse_args(["--standalone", "--nproc_per_node", "2", "-m", "imgrec", "train", flag, "x"])
        except SystemExit:
            refused.append(flag)
        else:
            assert parsed.training_script_args == ["train", flag, "x"]
    assert set(refused) <= {"--log"}, capsys.readouterr().err  # (argparse versions differ on --log itself)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO / "src")}


def torchrun(*args: str, cwd: Path, restarts: int = 0, script: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """torchrun --standalone --nproc_per_node 2 (python -m torch.distributed.run), under a timeout."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", str(restarts), "--monitor-interval", "0.5"]
    target = script or ["-m", "imgrec"]
    scratch = cwd.parent / f"{cwd.name}.tmp"  # torchrun's torchelastic_* folders go beside the test's, not in /tmp
    scratch.mkdir(exist_ok=True)
    env = {**_env(), "TMPDIR": str(scratch)}
    return subprocess.run([*launcher, *target, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=GROUP_TIMEOUT)


def rows(run: Path) -> list[dict[str, Any]]:
    with (run / "results.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 training images (3 classes), 48 validation, 48 test: 6 steps of 2 x 4 images per epoch."""
    return make_image_folder(tmp_path_factory.mktemp("ddp-data") / "photos", per_class=16,
                             splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def pair_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One uninterrupted torchrun group of two processes, 4 images each per step, logging to TensorBoard too."""
    project = tmp_path_factory.mktemp("pair")
    done = torchrun("train", "--data", str(data), "--project", str(project), "--name", "pair",
                    "--batch-size", str(PER_PROCESS_BATCH), *TRAIN, "--logger", "tensorboard", cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    return project / "pair", done


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT + 60)
def test_two_processes_train_like_one_with_the_same_global_batch(data: Path, tmp_path: Path,
                                                                 pair_run: tuple[Path, Any]) -> None:
    from imgrec.cli import main

    pair, _ = pair_run
    single = ["train", "--data", str(data), "--project", str(tmp_path), "--name", "single",
              "--batch-size", str(2 * PER_PROCESS_BATCH), *TRAIN]
    assert main(single) == 0
    a = load_weights_file(pair / "weights" / "last.pt")["state_dict"]
    b = load_weights_file(tmp_path / "single" / "weights" / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:  # DDP averages the two processes' mean-loss gradients: the mean over 2 x 4 images
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    pair_rows, single_rows = rows(pair), rows(tmp_path / "single")
    for p, s in zip(pair_rows, single_rows, strict=True):
        assert p["val_acc"] == s["val_acc"]  # validation counts summed over the shards: exact
        assert float(p["train_loss"]) == pytest.approx(float(s["train_loss"]), rel=1e-4)
        assert float(p["val_loss"]) == pytest.approx(float(s["val_loss"]), rel=1e-4)
    state = load_state(pair / "train_state.pt")
    assert state["world_size"] == 2 and state["progress"]["images_seen"] == 3 * 48


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT + 60)
def test_only_the_main_process_writes_and_logs(pair_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    pair, done = pair_run
    assert sorted(p.name for p in pair.parent.iterdir()) == ["pair"]  # one run folder, not one per process
    assert not list(pair.rglob("*.tmp"))
    assert done.stderr.count("run folder: ") == 1 and done.stdout.count("test accuracy: ") == 1
    assert done.stderr.count("epoch   1/3") == 1
    assert "effective batch of 8" in done.stderr
    assert len(rows(pair)) == 3
    assert {"config.yaml", "results.csv", "train_state.pt", "summary.json", "metrics.json", "report.html"} <= {
        p.name for p in pair.iterdir()}


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT + 60)
def test_only_the_main_process_writes_tensorboard_events(pair_run: tuple[Path, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pair, _ = pair_run
    files = list((pair / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents."), files  # one writer, not one a process
    events = EventAccumulator(str(pair / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = list(range(1, 3 * 6 + 1))  # 6 steps an epoch (48 images, 2 processes x 4), 3 epochs: each step once
    assert [e.step for e in events.Scalars("train/step_loss")] == steps
    assert [e.step for e in events.Scalars("train/lr")] == steps
    val_acc = [round(e.value, 5) for e in events.Scalars("epoch/val_acc")]
    assert val_acc == [round(float(r["val_acc"]), 5) for r in rows(pair)]  # the epochs' metrics of all processes


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT + 60)
def test_a_killed_process_restarts_the_group_which_resumes_the_same_run(
        data: Path, tmp_path: Path, pair_run: tuple[Path, Any]) -> None:
    # process 1 kills itself (SIGKILL) at batch 3 of epoch 2; the states saved after every step let it resume
    done = torchrun("kill", "1", "2", "3", "--", "train", "--data", str(data), "--project", str(tmp_path), "--name",
                    "pair", "--batch-size", str(PER_PROCESS_BATCH), *TRAIN, "--save-every-steps", "1",
                    cwd=tmp_path, restarts=1, script=[str(FAULTS)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restart 1: resuming" in done.stderr and "epoch 2, step 2" in done.stderr
    run = tmp_path / "pair"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]
    pair, _ = pair_run
    assert rows(run) == rows(pair)  # every epoch, and the same numbers as the uninterrupted group
    a = load_weights_file(run / "weights" / "last.pt")["state_dict"]
    b = load_weights_file(pair / "weights" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # each process resumed its own shard, generators and sums


@pytest.mark.ddp
@pytest.mark.timeout(2 * GROUP_TIMEOUT + 60)
def test_a_stop_signal_to_one_process_stops_all_at_one_step_and_resume_continues_exactly(
        data: Path, tmp_path: Path, pair_run: tuple[Path, Any]) -> None:
    # SIGTERM reaches process 1 alone, before batch 3 of epoch 2: both agree to stop after the same step
    stopped = torchrun("term", "1", "2", "3", "--", "train", "--data", str(data), "--project", str(tmp_path), "--name",
                       "pair", "--batch-size", str(PER_PROCESS_BATCH), *TRAIN, cwd=tmp_path, script=[str(FAULTS)])
    assert stopped.returncode != 0
    assert stopped.stderr.count("stopped by SIGTERM at epoch 2, step 3") == 1  # the main process's line
    state = load_state(tmp_path / "pair" / "train_state.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (2, 3)
    assert [p["loader"]["batches_done"] for p in state["processes"]] == [3, 3]
    resumed = torchrun("train", "--resume", str(tmp_path / "pair"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    pair, _ = pair_run
    assert rows(tmp_path / "pair") == rows(pair)
    a = load_weights_file(tmp_path / "pair" / "weights" / "last.pt")["state_dict"]
    b = load_weights_file(pair / "weights" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT + 60)
def test_a_process_that_raises_fails_the_whole_torchrun_group(data: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    done = torchrun("raise", "1", "2", "3", "--", "train", "--data", str(data), "--project", str(tmp_path),
                    "--batch-size", str(PER_PROCESS_BATCH), *TRAIN, cwd=tmp_path, script=[str(FAULTS)])
    assert done.returncode != 0
    assert "injected failure in process 1" in done.stderr
    assert time.monotonic() - started < GROUP_TIMEOUT


def launch_pair(kind: str, data: Path, cwd: Path, *extra: str) -> list[subprocess.Popen[str]]:
    """Two processes started the way a launcher without torchrun starts them (srun): only the variables."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(
            [sys.executable, str(FAULTS), kind, "1", "2", "3", "--", "train", "--data", str(data), "--project",
             str(cwd), "--batch-size", str(PER_PROCESS_BATCH), *TRAIN, *extra], env=env, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT + 60)
def test_a_process_that_stops_answering_fails_the_others_after_the_timeout(data: Path, tmp_path: Path) -> None:
    survivor, hung = launch_pair("hang", data, tmp_path, "--dist-timeout", "0.1")  # 6 seconds
    try:
        _, err = survivor.communicate(timeout=GROUP_TIMEOUT)
    finally:
        hung.kill()
        hung.communicate()
    assert survivor.returncode == 1
    assert err.strip().splitlines()[-1].startswith("imgrec train: error: process 0 of 2 lost the others"), err[-2000:]


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT + 60)
def test_without_torchrun_the_survivor_fails_with_one_line_too(data: Path, tmp_path: Path) -> None:
    """A launcher that only sets the variables (srun without torchrun): the group's own teardown."""
    procs = launch_pair("raise", data, tmp_path)
    outputs = [p.communicate(timeout=GROUP_TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert "injected failure in process 1" in outputs[1][1]
    last = outputs[0][1].strip().splitlines()[-1]
    assert last.startswith("imgrec train: error: process 0 of 2 lost the others"), outputs[0][1][-2000:]
    assert "Traceback" not in outputs[0][1]


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT + 60)
def test_a_run_resumes_only_with_as_many_processes(pair_run: tuple[Path, Any]) -> None:
    pair, _ = pair_run
    with pytest.raises(UsageError, match="trained by 2 processes; resume it with as many"):
        check_world_size(load_state(pair / "train_state.pt"))


def _freeze_then_train(rank: int, port: int, out: str) -> None:
    """One process of a spawned pair: train with the first layer frozen, then unfrozen, then frozen again."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup(1.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    first = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 4) + rank, torch.tensor([0, 1] * 3)  # each process its own data
    for trainable in (False, True, False):
        model[0].requires_grad_(trainable)
        wrapped = distributed.wrap_model(model)
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(wrapped(x), y).backward()
            optimizer.step()
    torch.save({"first_before": first, "params": [p.detach() for p in model.parameters()]}, f"{out}/{rank}.pt")
    distributed.teardown()


@pytest.mark.ddp
@pytest.mark.timeout(GROUP_TIMEOUT)
def test_unfreezing_rewraps_the_model_so_every_trainable_parameter_is_averaged(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(_freeze_then_train, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT - 30
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "the spawned pair hangs"
    a, b = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1))
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))  # the same model in both
    assert not torch.equal(a["params"][0], a["first_before"])  # the unfrozen layer learnt, averaged over both
