"""Continuous batching in the next-token engine: sequences join a running batch and leave it at
any step, over one pool of KV blocks. A sequence's tokens are the ones it gets alone; blocks follow
each sequence's progress and all come back."""

import pytest
import torch

from models.kv.paged import BLOCK_SIZE, BlockPool, OutOfBlocks
from models.llamagen.generate import Engine, Sequence, generate
from models.llamagen.loading import load_gpt
from models.llamagen.speculative import window_flops
from models.settings import ImageSettings, Speculative
from tests.conftest import REFERENCE


@pytest.fixture(scope="module")
def c2i():
    return load_gpt(REFERENCE / "llamagen_c2i.pt", n_head=2, image_size=256)


def pool_for(model, n_blocks):
    c = model.config
    return BlockPool(c.n_layer, n_blocks, c.n_kv_head, BLOCK_SIZE, c.head_dim)


def alone(model, label, settings):
    return generate(model, None, torch.tensor([label]), [settings], decode=False).tokens[0]


SETTINGS = [
    ImageSettings(seed=1, cfg=4.0, top_k=100),
    ImageSettings(seed=2, cfg=1.0, top_k=50, temperature=0.8),
    ImageSettings(seed=3, cfg=2.0, top_p=0.9, cfg_interval=100),
    ImageSettings(seed=4, cfg=1.0),
]


def test_sequences_joining_and_leaving_get_the_tokens_they_get_alone(c2i):
    c = c2i.config
    per_seq = -(-c.max_seq_len // BLOCK_SIZE)
    pool = pool_for(c2i, 8 * per_seq)
    engine = Engine(c2i, pool)
    seqs = [Sequence(torch.tensor(label), s) for label, s in zip((3, 5, 7, 1), SETTINGS, strict=True)]
    done: dict[int, torch.Tensor] = {}
    joins = {0: [0], 10: [1, 2], 100: [3]}  # step -> sequences joining before it
    step = 0
    while len(done) < len(seqs):
        if step in joins:
            engine.add([seqs[i] for i in joins[step]])
        finished = engine.finished
        engine.remove(finished)  # a sequence's tokens are its own once it leaves
        for s in finished:
            done[seqs.index(s)] = s.tokens
        engine.step()
        step += 1
    for i, (label, s) in enumerate(zip((3, 5, 7, 1), SETTINGS, strict=True)):
        assert torch.equal(done[i], alone(c2i, label, s)), i
        assert seqs[i].forward_passes == c.block_size  # one prefill, then a pass per token
    assert pool.num_free == pool.n_blocks  # every block came back
    # memory followed progress: never all four images' full caches at once
    assert pool.peak_used < sum(s.rows for s in seqs) * per_seq


def test_a_sequence_that_leaves_mid_image_gives_its_blocks_back(c2i):
    pool = pool_for(c2i, 64)
    engine = Engine(c2i, pool)
    stay, leave = Sequence(torch.tensor(2), SETTINGS[0]), Sequence(torch.tensor(4), SETTINGS[1])
    engine.add([stay, leave])
    for _ in range(40):
        engine.step()
    held = sum(map(len, leave.blocks))
    assert held == pool.blocks_for(c2i.config.cls_token_num + 40) and stay.n == leave.n == 41
    free = pool.num_free
    engine.remove([leave])
    assert pool.num_free == free + held and engine.seqs == [stay]
    while not engine.finished:
        engine.step()
    assert torch.equal(stay.tokens, alone(c2i, 2, SETTINGS[0]))
    engine.remove(engine.finished)
    assert pool.num_free == pool.n_blocks


def test_a_prefill_that_fails_gives_back_the_blocks_it_took(c2i, monkeypatch):
    # a device out of memory in a joiner's prefill: admission counts the running sequences, so
    # blocks kept by sequences that never joined would over-commit the pool for good
    pool = pool_for(c2i, 128)
    engine = Engine(c2i, pool)
    running = Sequence(torch.tensor(2), SETTINGS[0])
    engine.add([running])
    held = pool.num_used

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(c2i, "prefill", out_of_memory)
    joiners = [Sequence(torch.tensor(4), SETTINGS[1]), Sequence(torch.tensor(6), SETTINGS[2])]
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.add(joiners)
    assert pool.num_used == held and engine.seqs == [running]
    assert all(s.blocks == [] for s in joiners)
    monkeypatch.undo()
    engine.add(joiners)  # the pool admits them once the device has room again
    while engine.seqs:
        engine.remove(engine.finished)
        engine.step()
    assert torch.equal(joiners[0].tokens, alone(c2i, 4, SETTINGS[1]))
    assert pool.num_free == pool.n_blocks


def test_admission_is_bounded_by_free_blocks(c2i):
    pool = pool_for(c2i, 3)
    engine = Engine(c2i, pool)
    guided = [Sequence(torch.tensor(i), SETTINGS[0]) for i in range(2)]  # two rows each
    with pytest.raises(OutOfBlocks, match="4 blocks to admit 2 sequences, 3 free"):
        engine.add(guided)
    assert pool.num_free == 3 and engine.seqs == []  # nothing taken
    assert engine.blocks_needed(guided[:1]) == 2 * pool.blocks_for(c2i.config.max_seq_len)


def test_admission_plans_the_blocks_of_every_future_step(c2i):
    """A pool of 1.5 images' caches admits a second image once the first is half done: it never
    runs out, since the first gives its blocks back before the second needs its last ones."""
    c = c2i.config
    per_seq = -(-c.max_seq_len // BLOCK_SIZE)  # 16 blocks of 16 positions
    pool = pool_for(c2i, per_seq + per_seq // 2)
    engine = Engine(c2i, pool)
    first, second = (Sequence(torch.tensor(i), ImageSettings(seed=i, cfg=1.0)) for i in (1, 2))
    assert engine.fits([first, second]) is False
    engine.add([first])
    while not engine.fits([second]):
        engine.step()
    assert c.block_size // 2 - BLOCK_SIZE <= first.n <= c.block_size // 2 + BLOCK_SIZE
    engine.add([second])
    while engine.seqs:  # OutOfBlocks here would fail the test
        engine.step()
        engine.remove(engine.finished)
    assert torch.equal(second.tokens, alone(c2i, 2, second.settings))
    assert pool.peak_used <= pool.n_blocks and pool.num_free == pool.n_blocks


def speculative(seed, method, window, **kw):
    return ImageSettings(seed=seed, speculative=Speculative(method, window), **kw)


def test_speculative_sequences_join_a_running_batch_each_at_its_own_pace(c2i):
    """Sequences of several windows and methods join plain ones mid-image: every pass is as wide
    as the widest window, each sequence commits what it accepts, and each gets the tokens it gets
    alone. The plain rows' padding columns write past their blocks (the pool's trash block), never
    into another sequence's."""
    c = c2i.config
    pool = pool_for(c2i, 8 * -(-c.max_seq_len // BLOCK_SIZE))
    engine = Engine(c2i, pool)
    plan = [  # (joins before step, label, settings)
        (0, 3, SETTINGS[0]),
        (0, 5, speculative(11, "scd", 8, cfg=2.0, top_k=50)),
        (20, 7, SETTINGS[1]),
        (30, 1, speculative(12, "sjd", 4, cfg=1.0, top_k=100)),
        (30, 2, speculative(13, "gsd", 16, cfg=3.0, top_k=20)),
    ]
    seqs = [Sequence(torch.tensor(label), s) for _, label, s in plan]
    step, done = 0, {}
    while len(done) < len(seqs):
        joining = [seq for (at, _, _), seq in zip(plan, seqs, strict=True) if at == step]
        if joining:
            engine.add(joining)
        finished = engine.finished
        engine.remove(finished)
        done.update({id(s): s.tokens for s in finished})
        engine.step()
        step += 1
    for (_, label, s), seq in zip(plan, seqs, strict=True):
        assert torch.equal(done[id(seq)], alone(c2i, label, s)), s
        if s.speculative.on:
            assert seq.forward_passes < c.block_size and seq.accepted > 0, seq.forward_passes
        else:
            assert seq.forward_passes == c.block_size
    assert pool.num_free == pool.n_blocks  # every block came back


def test_a_pass_of_unequal_windows_runs_only_its_real_tokens(c2i, monkeypatch):
    """One guided sequence at window 8 beside a plain guided one: the pass is 8 columns wide, and
    its layers run the 2 x 8 tokens of the speculative rows and the 2 x 1 of the plain ones, not
    4 x 8. A pass of equal windows (the plain sequence alone) passes no slots."""
    seen = []
    real = c2i.decode_step

    def spy(tokens, positions, store, key_valid=None, slots=None):
        seen.append((tuple(tokens.shape), None if slots is None else slots.tolist()))
        return real(tokens, positions, store, key_valid, slots)

    monkeypatch.setattr(c2i, "decode_step", spy)
    engine = Engine(c2i, pool_for(c2i, 64))
    plain, spec = (
        Sequence(torch.tensor(3), SETTINGS[0]),
        Sequence(torch.tensor(5), speculative(11, "scd", 8, cfg=2.0)),
    )
    engine.add([spec, plain])  # rows: spec, plain, then their null rows in the same order
    before = engine.flops
    engine.step()
    assert seen[-1] == ((4, 8), [*range(0, 8), 8, *range(16, 24), 24])
    # the pass's FLOPs count its 18 real tokens, not 4 x 8
    full = window_flops(c2i, 4, 8, max(s.n for s in engine.seqs))  # keys as the engine counts them
    assert engine.flops - before == pytest.approx(full * 18 / 32)
    engine.remove([spec])
    engine.step()
    assert seen[-1] == ((2, 1), None)


def test_a_speculative_sequence_holds_its_whole_cache_in_admission(c2i):
    """Its progress per pass is what it accepts, so admission counts its whole cache from the
    start: where a plain sequence half done lets a second image into a pool of 1.5 images, a
    speculative one as far along does not."""
    c = c2i.config
    per_seq = -(-c.max_seq_len // BLOCK_SIZE)
    second = Sequence(torch.tensor(2), ImageSettings(seed=2, cfg=1.0))
    engines = {}
    for kind, settings in (
        ("plain", ImageSettings(seed=1, cfg=1.0)),
        ("sjd", speculative(1, "sjd", 4, cfg=1.0)),
    ):
        engine = Engine(c2i, pool_for(c2i, per_seq + per_seq // 2))
        first = Sequence(torch.tensor(1), settings)
        engine.add([first])
        while first.n < c.block_size // 2 + 2 * BLOCK_SIZE:
            engine.step()
        engines[kind] = engine
    assert engines["plain"].fits([second]) and not engines["sjd"].fits([second])


def blocks_ahead_by_definition(engine, seqs) -> list[int]:
    """The blocks the batch would hold during each of the next block_size steps if `seqs` joined
    now, position by position from the pool's own rule (a plain sequence with n tokens holds the
    blocks of positions 0..cls + n + k - 1 at the k-th step until it ends; a speculative one its
    whole cache; a newcomer starts at n = 1)."""
    c, pool = engine.model.config, engine.pool
    whole = pool.blocks_for(c.max_seq_len)
    members = [(s, s.n) for s in engine.seqs] + [(s, 1) for s in seqs]
    return [
        sum(
            s.rows
            * (whole if s.speculative else pool.blocks_for(c.cls_token_num + n + k) * (n + k < c.block_size))
            for s, n in members
        )
        for k in range(c.block_size)
    ]


def test_admission_agrees_with_the_blocks_held_step_by_step_as_the_batch_runs(c2i):
    """The engine keeps the batch's future holdings from its last change of membership and reads
    them at the steps since; at every step of a batch that sequences of both kinds join and leave,
    its answer for several would-be newcomers is the one worked out from the definition."""
    c = c2i.config
    per_seq = -(-c.max_seq_len // BLOCK_SIZE)
    engine = Engine(c2i, pool_for(c2i, 3 * per_seq))
    newcomers = [
        [Sequence(torch.tensor(0), ImageSettings(seed=0, cfg=1.0))],
        [Sequence(torch.tensor(0), ImageSettings(seed=0, cfg=2.0))],  # two rows
        [Sequence(torch.tensor(0), speculative(0, "sjd", 4, cfg=1.0))],
    ]
    joins = {
        0: Sequence(torch.tensor(1), ImageSettings(seed=1, cfg=1.0)),
        30: Sequence(torch.tensor(2), speculative(2, "scd", 4, cfg=1.0)),
        90: Sequence(torch.tensor(3), ImageSettings(seed=3, cfg=1.0)),
    }
    answers = set()
    for step in range(300):
        if step in joins:
            engine.add([joins[step]])
        engine.remove(engine.finished)
        for seqs in newcomers:
            expected = max(blocks_ahead_by_definition(engine, seqs)) <= engine.pool.n_blocks
            assert engine.fits(seqs) is expected, (step, [s.n for s in engine.seqs])
            answers.add(expected)
        engine.step()
    assert answers == {True, False}  # both answers came up
