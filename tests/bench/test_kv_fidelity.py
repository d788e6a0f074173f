"""bench.kv_fidelity's core on the bundled var-shapes model, 2 images per cell: the tables have a row
per cell and their columns, full against itself agrees everywhere and its PSNR is the cap, and the
planned bytes of the published shapes follow the papers' accounting."""

import numpy as np
import pytest

from bench import kv_fidelity as kf
from bench.quality import train_classifier
from models.config import DEFAULT_CONFIG, load_config
from models.runner import load_runner


@pytest.fixture(scope="module")
def runner():
    return load_runner(next(s for s in load_config(DEFAULT_CONFIG) if s.name == "var-shapes"))


def test_the_tables_cover_every_cell_and_full_agrees_with_itself(runner):
    cells = kf.cells_of(["heatkv"], [0.1])  # full + one compressing policy
    classes, seeds = kf.workload(2, 0)
    assert classes == [0, 1] and seeds == [0, 1]
    runs = {c: kf.run_cell(runner, c, classes, seeds) for c in cells}
    clf, _ = train_classifier(n=64, steps=2)  # its accuracy is not under test here
    correct = {c: kf.shape_correct(clf, runs[c], classes) for c in cells}
    ref = runs[cells[0]]
    patch_nums = runner.model.cfg.patch_nums
    fid = {c: kf.fidelity(runs[c], ref, correct[c], correct[cells[0]], patch_nums) for c in cells}

    full = fid[cells[0]]
    assert full.agreement == [1.0] * (len(patch_nums) + 1)
    assert full.psnr_mean == kf.PSNR_CAP and full.identical == 1.0 and np.isnan(full.psnr_differing)
    assert full.delta == 0.0
    heat = runs[cells[1]]
    assert 0 < heat.stored <= 0.1 * heat.full and heat.full == ref.full == ref.stored
    assert np.all(kf.psnr(ref.images, ref.images) == kf.PSNR_CAP)

    speeds = kf.speeds(runner, cells, batch=1, images=1, rounds=1)
    for head, rows in (
        kf.bytes_table(cells, runs, speeds),
        kf.agreement_table(cells, fid, patch_nums),
        kf.psnr_table(cells, fid),
        kf.accuracy_table(cells, fid),
        kf.speed_table(cells, [speeds]),
    ):
        assert len(rows) == len(cells) and all(len(r) == len(head) for r in rows)
        table = kf.markdown(head, rows).splitlines()
        assert len(table) == 2 + len(cells) and all(line.count("|") == len(head) + 1 for line in table)
    _, agreement = kf.agreement_table(cells, fid, patch_nums)
    assert agreement[0][2:] == ["100.0%"] * (len(patch_nums) + 1)


def test_published_bytes_follow_the_papers_accounting():
    cells = kf.cells_of(["window", "heatkv"], [1.0, 0.1])
    head, rows = kf.published_table(cells)
    assert len(rows) == 1 + len(cells) and all(len(r) == len(head) for r in rows)
    # VAR-d16, batch 16 guided, fp16: 424 tokens x 2 (K, V) x 16 layers x 16 heads x 64 x 2 bytes x 32 rows
    papers_d16 = 424 * 2 * 16 * 16 * 64 * 2 * 32
    assert rows[0][2] == f"{papers_d16 / 2**20:.1f}"
    assert rows[1][2] == rows[0][2] and rows[1][4] == "1.000"  # full is the papers' full prefix
    by_label = {(r[0], r[1]): r for r in rows[1:]}
    assert by_label["window", "100%"][2] == rows[0][2]
    assert float(by_label["window", "10%"][4]) <= 0.1 and float(by_label["heatkv", "10%"][7]) <= 0.1
