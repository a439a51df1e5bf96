"""2-process (gloo, CPU) evaluation with DistributedSampler padding equals 1 process bit-for-bit."""

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from mcad.evaluation.accumulator import AnomalyMetricAccumulator

CLASSES = ["a", "b", "c"]
N = 37  # odd: DistributedSampler pads with duplicated samples


def dataset():
    from metrics_reference import random_maps, random_masks

    rng = np.random.default_rng(0)
    masks = random_masks(rng, N, 24, 24, empty_fraction=0.3)
    masks[:3] = 0  # every class gets normal and anomalous images, so that no metric is NaN
    masks[3:6, 5:9, 5:9] = 1
    maps = random_maps(rng, masks, signal=1.0)
    labels = (masks.reshape(N, -1).max(1) > 0).astype(np.int64)
    class_ids = np.arange(N) % len(CLASSES)
    rng.shuffle(class_ids)
    class_ids[:6] = [0, 1, 2, 0, 1, 2]
    scores = maps.reshape(N, -1).max(1).astype(np.float64) * 10
    return scores, labels, class_ids, maps, masks


def evaluate(order, batch=4):
    scores, labels, class_ids, maps, masks = dataset()
    acc = AnomalyMetricAccumulator(CLASSES)
    order = np.asarray(order)
    for b in range(0, len(order), batch):
        i = order[b : b + batch]
        acc.update(
            torch.from_numpy(scores[i]),
            torch.from_numpy(labels[i]),
            torch.from_numpy(class_ids[i]),
            torch.from_numpy(i),
            torch.from_numpy(maps[i]),
            torch.from_numpy(masks[i]),
        )
    return acc, acc.compute()


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        for shuffle in (False, True):  # evaluation order (shuffle=False) and an arbitrary order
            sampler = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=shuffle, seed=3)
            acc, result = evaluate(list(sampler))
            local = sum(len(x) for x in acc.indices)
            out[shuffle] = {"result": result, "local": local, "states_restored": isinstance(acc.indices, list)}
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    world = 2
    mp.spawn(worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    _, single = evaluate(range(N))
    assert not np.isnan(list(single["mean"].values())).any()
    assert set(single["per_class"]) == set(CLASSES)
    for shuffle in (False, True):
        locals_ = []
        for rank in range(world):
            with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
                got = pickle.load(f)[shuffle]
            assert got["result"] == single  # bit-identical, every class and metric
            assert got["states_restored"]  # local (unsynced) states are back after compute
            locals_.append(got["local"])
        assert sum(locals_) == N + 1  # one padded duplicate was evaluated and dropped


ROW = 24 * 24 * 5  # bytes of one stored float32 24x24 map + uint8 mask


def spilled_worker(rank, world, init_file, out_dir):
    from mcad.evaluation import accumulator as accumulator_module

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, _, class_ids, _, _ = dataset()
        # A skewed split: rank 0 holds every sample of class "a" (and a duplicate of one "b" sample), rank 1 the
        # rest, so that ranks contribute different counts per class, including zero.
        first_b = int(np.flatnonzero(class_ids == 1)[0])
        skewed = [np.flatnonzero(class_ids == 0).tolist() + [first_b], np.flatnonzero(class_ids != 0).tolist()]
        sampler = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=True, seed=5)
        cases = {
            "budget0": (list(sampler), 0, None),
            "budget5_blocks3": (list(sampler), 5 * ROW, 3 * ROW),  # memory + disk rows, 3 rows per gather round
            "skewed_budget0": (skewed[rank], 0, 2 * ROW),
        }
        out = {}
        default_block = accumulator_module._GATHER_BLOCK_BYTES
        for name, (order, budget, block) in cases.items():
            accumulator_module._GATHER_BLOCK_BYTES = block or default_block
            acc = AnomalyMetricAccumulator(CLASSES, memory_budget=budget, spill_dir=out_dir)
            order = np.asarray(order)
            scores, labels, class_ids, maps, masks = dataset()
            for b in range(0, len(order), 4):
                i = order[b : b + 4]
                acc.update(
                    torch.from_numpy(scores[i]),
                    torch.from_numpy(labels[i]),
                    torch.from_numpy(class_ids[i]),
                    torch.from_numpy(i),
                    torch.from_numpy(maps[i]),
                    torch.from_numpy(masks[i]),
                )
            spilled = acc.spilled
            result = acc.compute()
            acc.reset()
            out[name] = {"result": result, "spilled": spilled, "files_after_reset": acc.spill_files}
        with open(f"{out_dir}/spilled_rank{rank}.pkl", "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_spilled_equal_one_process(tmp_path):
    world = 2
    mp.spawn(spilled_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    _, single = evaluate(range(N))  # one process, everything in memory
    for rank in range(world):
        with open(tmp_path / f"spilled_rank{rank}.pkl", "rb") as f:
            got = pickle.load(f)
        for name, case in got.items():
            assert case["spilled"], name
            assert case["result"] == single, name  # bit-identical, every class and metric
            assert case["files_after_reset"] == 0, name
