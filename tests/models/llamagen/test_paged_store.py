"""The paged KV store behind the model's cache seam: the fixture LlamaGen c2i model's prefill and
decode steps (and a verify window) give the dense store's logits, rows hold the blocks their
positions need, and the pool gets every block back."""

import pytest
import torch

from models.kv.paged import BlockPool, OutOfBlocks, PagedTokenStore
from models.llamagen.loading import load_gpt
from tests.conftest import REFERENCE


@pytest.fixture(scope="module")
def c2i():
    return load_gpt(REFERENCE / "llamagen_c2i.pt", n_head=2, image_size=256)


def pool_for(model, n_blocks, block_size=16):
    c = model.config
    return BlockPool(c.n_layer, n_blocks, c.n_kv_head, block_size, c.head_dim)


def test_pool_hands_out_and_takes_back_blocks():
    pool = BlockPool(n_layer=2, n_blocks=5, n_kv_head=1, block_size=16, head_dim=8)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 2 and pool.block_nbytes == 2 * 2 * 16 * 8 * 4
    with pytest.raises(OutOfBlocks, match="3 blocks asked, 2 free of 5"):
        pool.allocate(3)
    pool.release(a)
    assert pool.num_free == 5 and pool.peak_used == 3
    assert pool.allocate(1) == [0]  # low indices first, whatever came back


def test_paged_store_gives_the_dense_stores_logits(c2i):
    c = c2i.config
    labels = torch.tensor([1, 7, 3])
    dense = c2i.new_kv_store(3)
    pool = pool_for(c2i, n_blocks=3 * c.max_seq_len // 16 + 4)
    paged = PagedTokenStore(pool, c.max_seq_len)
    paged.set_rows([[], [], []])
    for r in range(3):
        paged.grow(r, c.cls_token_num)
    cond = c2i.embed_cond(labels)
    with torch.inference_mode():
        torch.testing.assert_close(c2i.prefill(cond, paged), c2i.prefill(cond, dense))
        tokens = torch.tensor([[5], [9], [2]])
        positions = torch.full((3, 1), c.cls_token_num)
        for _ in range(40):  # across two block edges
            for r in range(3):
                paged.grow(r, int(positions[r, 0]) + 1)
            want = c2i.decode_step(tokens, positions, dense)
            got = c2i.decode_step(tokens, positions, paged)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            tokens, positions = want[:, -1].argmax(-1, keepdim=True), positions + 1
        # a verify window of 6 tokens per row, rows at different places (the positions skipped
        # are zero keys in both: the dense buffer's zeros, the fresh blocks' zeros)
        window = torch.randint(0, c.vocab_size, (3, 6))
        starts = positions + torch.tensor([[0], [3], [7]])
        span = starts + torch.arange(6)
        for r in range(3):
            paged.grow(r, int(span[r, -1]) + 1)
        got = c2i.decode_step(window, span, paged)
        want = c2i.decode_step(window, span, dense)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert paged.nbytes == sum(map(len, paged.tables)) * pool.block_nbytes < dense.nbytes


def test_rows_hold_the_blocks_their_positions_need():
    pool = BlockPool(n_layer=1, n_blocks=8, n_kv_head=1, block_size=16, head_dim=16)
    store = PagedTokenStore(pool, max_len=100)
    store.set_rows([[], []])
    store.grow(0, 1)
    store.grow(1, 33)
    assert [len(t) for t in store.tables] == [1, 3] and pool.num_free == 4
    store.grow(0, 16)  # still its first block
    assert len(store.tables[0]) == 1
    table = store.block_table
    assert table.shape == (2, 7) and table[1, :3].tolist() == store.tables[1]
    with pytest.raises(OutOfBlocks):
        store.grow(0, 100)
    for blocks in store.tables:
        pool.release(blocks)
    assert pool.num_free == 8


def test_the_block_table_is_written_in_place_as_rows_take_blocks():
    """Rows crossing into new blocks one at a time, the table read between (as steps do): it is
    always what rebuilding it from the rows' lists gives, the trash block past each row's blocks;
    a table already copied to a device is never rewritten under the copy."""
    pool = BlockPool(n_layer=1, n_blocks=40, n_kv_head=1, block_size=16, head_dim=16)
    store = PagedTokenStore(pool, max_len=160)
    store.set_rows([pool.allocate(1), [], pool.allocate(2)])
    g = torch.Generator().manual_seed(0)
    positions = [16, 0, 32]
    for _ in range(20):
        row = int(torch.randint(3, (), generator=g))
        positions[row] = min(160, positions[row] + int(torch.randint(1, 40, (), generator=g)))
        store.grow(row, positions[row])
        rebuilt = torch.full((3, 10), pool.trash, dtype=torch.int32)
        for r, blocks in enumerate(store.tables):
            rebuilt[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        assert torch.equal(store.block_table, rebuilt)
    assert store.peak_blocks == sum(map(len, store.tables))
    # on a GPU the device's table is a copy the host may still be sending from: a new host table
    store.set_rows([[], []])
    sent_from = store._host_table
    store._block_table = sent_from.clone()  # as `.to("cuda", non_blocking=True)` gives
    store.grow(0, 16)
    assert bool((sent_from == pool.trash).all()) and store._host_table is not sent_from
    assert store.block_table[0, :1].tolist() == store.tables[0]
    free = pool.num_free
    with pytest.raises(ValueError, match="past the store's 10 blocks a row"):
        store.grow(1, 161)
    assert pool.num_free == free and store.tables[1] == []  # refused before taking any


def test_bytes_count_the_blocks_rows_arrive_with():
    # a row whose prefill blocks hold its whole cache never grows: its bytes are still counted
    pool = BlockPool(n_layer=1, n_blocks=8, n_kv_head=1, block_size=16, head_dim=16)
    store = PagedTokenStore(pool, max_len=16)
    store.set_rows([pool.allocate(1), pool.allocate(1)])
    store.grow(0, 16)
    assert store.nbytes == 2 * pool.block_nbytes
    store.set_rows([store.tables[0]])  # a row leaves: the peak stays
    assert store.nbytes == 2 * pool.block_nbytes
