"""Each epoch's plan of batches (data.BucketBatchSampler), checked over many awkward datasets."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

from diffusion_trainer.data.buckets import BucketBatchSampler

SHAPES = [(64, 64), (48, 80), (80, 48), (56, 72)]


def random_case(rng: random.Random) -> dict:
    shapes = rng.sample(SHAPES, rng.randint(1, len(SHAPES)))
    images = rng.randint(1, 40)
    return {"targets": [rng.choice(shapes) for _ in range(images)], "batch": rng.randint(1, 8),
            "processes": rng.randint(1, 8), "seed": rng.randrange(2**31), "epoch": rng.randint(0, 3)}


def samplers(case: dict) -> list[BucketBatchSampler]:
    samples = SimpleNamespace(targets=case["targets"], epoch=case["epoch"])
    return [BucketBatchSampler(samples, case["batch"], case["seed"], case["processes"], k)
            for k in range(case["processes"])]


def check_plan(case: dict) -> None:
    targets, size, processes = case["targets"], case["batch"], case["processes"]
    ranks = samplers(case)
    shares = [list(sampler) for sampler in ranks]
    # every process: the same, exact number of batches, each full and of one shape
    assert [len(sampler) for sampler in ranks] == [len(share) for share in shares] == [len(shares[0])] * processes
    for batch in (b for share in shares for b in share):
        assert len(batch) == size and len({targets[i] for i in batch}) == 1
        if Counter(targets)[targets[batch[0]]] >= size:
            assert len(set(batch)) == size  # a bucket that fills a batch repeats no image within one
    # every image at least once; no more batches than the buckets need, rounded up to the processes
    assert {i for share in shares for b in share for i in b} == set(range(len(targets)))
    needed = sum(-(-count // size) for count in Counter(targets).values())
    assert len(shares[0]) == -(-needed // processes)
    # a pure function of (seed, epoch): dealt out in turn from one plan, the same for a new sampler
    plan = ranks[0].epoch_plan(case["epoch"])
    assert all(shares[k] == plan[k::processes] for k in range(processes))
    assert [list(s) for s in samplers(case)] == shares


def test_every_epoch_is_an_exact_plan_over_many_awkward_datasets():
    rng = random.Random(16)
    for _ in range(400):
        case = random_case(rng)
        try:
            check_plan(case)
        except AssertionError as error:
            raise AssertionError(f"{case}: {error}") from error


def test_the_issue_cases():
    # 9 images, batch 2, 2 processes: 5 batches (the last topped up) and one extra, 3 each
    nine = {"targets": [(64, 64)] * 9, "batch": 2, "processes": 2, "seed": 0, "epoch": 1}
    check_plan(nine)
    assert [len(s) for s in samplers(nine)] == [3, 3]
    # 7 square, 6 wide, 3 tall at batch 4 on 2 processes: 2 + 2 + 1 batches, one extra: 3 each
    mixed = {"targets": [(64, 64)] * 7 + [(48, 80)] * 6 + [(80, 48)] * 3, "batch": 4, "processes": 2,
             "seed": 0, "epoch": 1}
    check_plan(mixed)
    assert [len(s) for s in samplers(mixed)] == [3, 3]


def test_each_epoch_has_its_own_order_and_an_even_dataset_trains_each_image_once():
    case = {"targets": [(64, 64)] * 12 + [(48, 80)] * 8, "batch": 4, "processes": 1, "seed": 3, "epoch": 1}
    first = list(samplers(case)[0])
    second = list(samplers({**case, "epoch": 2})[0])
    assert first != second and sorted(map(sorted, first)) != sorted(map(sorted, second))
    # nothing to top up: every image exactly once
    assert sorted(i for b in first for i in b) == list(range(20))
