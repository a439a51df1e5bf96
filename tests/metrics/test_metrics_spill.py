"""Bounded-memory storage of the accumulator: the spilled (disk) path equals the in-memory path bit for bit,
the size decision is observable, and the spill files never outlive the accumulator."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_metrics_accumulator import CLASSES, make_dataset

from mcad.evaluation import accumulator as accumulator_module
from mcad.evaluation.accumulator import (
    MEMORY_BUDGET_ENV,
    AnomalyMetricAccumulator,
    compute_metrics,
    default_memory_budget,
)

SIZE = 32
ROW = SIZE * SIZE * (4 + 1)  # bytes of one stored float32 map + uint8 mask


def feed(acc, data, order, batch=7):
    scores, labels, class_ids, maps, masks = data
    for b in range(0, len(order), batch):
        i = order[b : b + batch]
        acc.update(
            torch.from_numpy(scores[i]),
            torch.from_numpy(labels[i]),
            torch.from_numpy(class_ids[i]),
            torch.from_numpy(i),
            torch.from_numpy(maps[i]),
            torch.from_numpy(masks[i]).bool(),
        )


def open_files_in(directory: Path) -> int:
    """Descriptors of this process that point into ``directory`` (nameless files show as '#123 (deleted)')."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(directory))
    return count


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")


@pytest.mark.parametrize("map_dtype", [torch.float32, torch.float16, torch.float64])
def test_spilled_path_is_bit_identical_to_in_memory(tmp_path, map_dtype):
    data = make_dataset(seed=11, n=60, size=SIZE)
    n = len(data[0])
    # Shuffled (classes interleaved within batches) with sampler-style duplicates.
    order = np.concatenate([np.random.default_rng(1).permutation(n), [0, 7, 7, n - 1]])
    row = SIZE * SIZE * (torch.finfo(map_dtype).bits // 8 + 1)
    results = {}
    for budget in (None, 0, 5 * row, 10 * row + 3):
        acc = AnomalyMetricAccumulator(CLASSES, map_dtype=map_dtype, memory_budget=budget, spill_dir=tmp_path)
        feed(acc, data, order)
        assert acc.spilled == (budget is not None)
        assert acc.bytes_in_memory + acc.bytes_on_disk == len(order) * row
        if budget is not None:
            assert acc.bytes_in_memory <= max(budget, row) and acc.bytes_on_disk > 0
        results[budget] = acc.compute()
        acc.reset()
    assert results[0] == results[None]  # exactly equal, every class and metric
    assert results[5 * row] == results[None]
    assert results[10 * row + 3] == results[None]
    if map_dtype == torch.float32:
        assert results[None] == compute_metrics(*data[:3], CLASSES, data[3], data[4], indices=np.arange(n))


def test_size_decision_in_memory_below_budget_spill_above(tmp_path):
    data = make_dataset(seed=12, n=20, size=SIZE)
    acc = AnomalyMetricAccumulator(CLASSES, memory_budget=8 * ROW, spill_dir=tmp_path)
    assert acc.memory_budget == 8 * ROW
    feed(acc, data, np.arange(8), batch=3)
    assert not acc.spilled and acc.bytes_in_memory == 8 * ROW and acc.bytes_on_disk == 0 and acc.spill_files == 0
    feed(acc, data, np.arange(8, 9))  # one row more than the budget: the staged rows go to disk
    assert acc.spilled and acc.bytes_on_disk == 8 * ROW and acc.bytes_in_memory == ROW
    assert acc.spill_files == 2 * 3  # a maps and a masks file per class with spilled rows
    feed(acc, data, np.arange(9, 20), batch=4)
    assert acc.bytes_in_memory <= 8 * ROW and acc.bytes_in_memory + acc.bytes_on_disk == 20 * ROW
    everything = AnomalyMetricAccumulator(CLASSES, memory_budget=20 * ROW)
    feed(everything, data, np.arange(20))
    assert not everything.spilled and everything.bytes_in_memory == 20 * ROW
    assert acc.compute() == everything.compute()


def test_default_budget_is_automatic_and_env_overrides(monkeypatch):
    monkeypatch.delenv(MEMORY_BUDGET_ENV, raising=False)
    budget = AnomalyMetricAccumulator(CLASSES).memory_budget
    assert budget == default_memory_budget()
    assert 0 < budget <= accumulator_module._MAX_IN_MEMORY_BYTES
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "0")
    acc = AnomalyMetricAccumulator(CLASSES)
    assert acc.memory_budget == 0
    assert AnomalyMetricAccumulator(CLASSES, memory_budget=1000).memory_budget == 1000  # explicit wins
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=MEMORY_BUDGET_ENV):
        AnomalyMetricAccumulator(CLASSES)
    with pytest.raises(ValueError, match="memory_budget"):
        AnomalyMetricAccumulator(CLASSES, memory_budget=-1)


@needs_proc
def test_spill_files_are_nameless_and_closed_by_reset(tmp_path):
    data = make_dataset(seed=13, n=30, size=SIZE)
    acc = AnomalyMetricAccumulator(CLASSES, memory_budget=0, spill_dir=tmp_path)
    feed(acc, data, np.arange(30))
    assert acc.spilled and acc.spill_files == 6
    assert os.listdir(tmp_path) == []  # no name in the file system at any time
    assert open_files_in(tmp_path) == 6
    first = acc.compute()
    assert open_files_in(tmp_path) == 6  # compute keeps the states (torchmetrics semantics)
    acc.reset()
    assert open_files_in(tmp_path) == 0 and acc.spill_files == 0 and not acc.spilled
    feed(acc, data, np.arange(30))  # reusable after reset
    assert acc.compute() == first
    acc.reset()
    assert open_files_in(tmp_path) == 0


@needs_proc
def test_spill_files_are_released_after_exceptions(tmp_path):
    data = make_dataset(seed=14, n=30, size=SIZE)
    scores, labels, class_ids, maps, masks = data
    acc = AnomalyMetricAccumulator(CLASSES, memory_budget=0, spill_dir=tmp_path)
    feed(acc, data, np.arange(30))
    z = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="binarise"):
        acc.update(torch.rand(2), z, z, torch.arange(30, 32), torch.rand(2, SIZE, SIZE), torch.rand(2, SIZE, SIZE))
    # The failed batch stored nothing (neither scores nor maps): compute still works.
    clean = AnomalyMetricAccumulator(CLASSES)
    feed(clean, data, np.arange(30))
    assert acc.compute() == clean.compute()
    acc.update(  # same index, other label: compute raises
        torch.tensor([0.0]),
        torch.tensor([1 - labels[0]]),
        torch.tensor([class_ids[0]]),
        torch.tensor([0]),
        torch.from_numpy(maps[:1]),
        torch.from_numpy(masks[:1]),
    )
    with pytest.raises(ValueError, match="test index"):
        acc.compute()
    assert open_files_in(tmp_path) == 6
    del acc
    gc.collect()
    assert open_files_in(tmp_path) == 0


def test_spill_files_vanish_when_the_process_is_killed(tmp_path):
    code = (
        "import os, torch\n"
        "from mcad.evaluation.accumulator import AnomalyMetricAccumulator\n"
        f"acc = AnomalyMetricAccumulator(['a'], memory_budget=0, spill_dir={str(tmp_path)!r})\n"
        "z = torch.zeros(4, dtype=torch.long)\n"
        "masks = torch.zeros(4, 64, 64, dtype=torch.bool)\n"
        "acc.update(torch.rand(4), z, z, torch.arange(4), torch.rand(4, 64, 64), masks)\n"
        "assert acc.spilled and acc.bytes_on_disk > 0\n"
        "print('spilled', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9 and "spilled" in done.stdout, done.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_spilled_accumulator_refuses_to_be_copied(tmp_path):
    data = make_dataset(seed=15, n=10, size=SIZE)
    acc = AnomalyMetricAccumulator(CLASSES, spill_dir=tmp_path)
    feed(acc, data, np.arange(10))
    assert acc.clone().compute() == acc.compute()  # in-memory states copy fine
    spilled = AnomalyMetricAccumulator(CLASSES, memory_budget=0, spill_dir=tmp_path)
    feed(spilled, data, np.arange(10))
    with pytest.raises(TypeError, match="spilled"):
        spilled.clone()


@pytest.mark.parametrize("map_dtype", [torch.float32, torch.float16])
def test_tensor_copy_path_equals_numpy_path(tmp_path, monkeypatch, map_dtype):
    # Accelerator tensors are copied and checked with torch ops instead of NumPy views; forcing that path on
    # the CPU checks it without a GPU.
    data = make_dataset(seed=16, n=30, size=SIZE)
    expected = AnomalyMetricAccumulator(CLASSES, map_dtype=map_dtype, memory_budget=0, spill_dir=tmp_path)
    feed(expected, data, np.arange(30))
    monkeypatch.setattr(accumulator_module, "_host", lambda x: x)
    acc = AnomalyMetricAccumulator(CLASSES, map_dtype=map_dtype, memory_budget=3 * ROW, spill_dir=tmp_path)
    scores, labels, class_ids, maps, masks = data
    for b in range(0, 30, 7):
        i = np.arange(b, min(b + 7, 30))
        acc.update(
            torch.from_numpy(scores[i]),
            torch.from_numpy(labels[i]),
            torch.from_numpy(class_ids[i]),
            torch.from_numpy(i),
            torch.from_numpy(maps[i]),
            torch.from_numpy(masks[i]).long(),  # integer masks: validated with min/max
        )
    assert acc.compute() == expected.compute()
    z = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="0 and 1"):
        acc.update(torch.rand(2), z, z, torch.arange(2), torch.rand(2, SIZE, SIZE), torch.full((2, SIZE, SIZE), 2))


def test_bfloat16_maps_are_stored_exactly(tmp_path):
    data = list(make_dataset(seed=17, n=20, size=SIZE))
    data[3] = torch.from_numpy(data[3]).bfloat16().float().numpy()  # values representable in bfloat16
    expected = AnomalyMetricAccumulator(CLASSES)
    feed(expected, data, np.arange(20))
    acc = AnomalyMetricAccumulator(CLASSES, memory_budget=0, spill_dir=tmp_path)
    scores, labels, class_ids, maps, masks = data
    acc.update(
        torch.from_numpy(scores),
        torch.from_numpy(labels),
        torch.from_numpy(class_ids),
        torch.arange(20),
        torch.from_numpy(maps).bfloat16(),
        torch.from_numpy(masks),
    )
    assert acc.compute() == expected.compute()


def test_failed_spill_is_reported_and_reset_recovers(tmp_path, monkeypatch):
    import errno

    data = make_dataset(seed=18, n=20, size=SIZE)
    acc = AnomalyMetricAccumulator(CLASSES, memory_budget=4 * ROW, spill_dir=tmp_path)
    feed(acc, data, np.arange(4))

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accumulator_module.os, "write", disk_full)
    with pytest.raises(OSError, match="spill_dir"):  # names the remedy
        feed(acc, data, np.arange(4, 8))
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="failed earlier"):
        feed(acc, data, np.arange(8, 12))
    with pytest.raises(RuntimeError, match="failed earlier"):
        acc.compute()
    acc.reset()
    feed(acc, data, np.arange(20))
    clean = AnomalyMetricAccumulator(CLASSES)
    feed(clean, data, np.arange(20))
    assert acc.spilled and acc.compute() == clean.compute()
