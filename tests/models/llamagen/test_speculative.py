"""Speculative decoding (models/llamagen/speculative.py): greedy equality with plain decoding, the
model's own distribution (exact marginals of a tiny model against many seeds), batch
independence, guidance, previews, the auto window, and fewer passes on the bundled model."""

import itertools
import time

import pytest
import torch
from scipy.stats import chi2

from kernels import speculative as ks
from models.config import DEFAULT_CONFIG, load_config
from models.llamagen import speculative
from models.llamagen.generate import generate
from models.llamagen.loading import load_gpt
from models.llamagen.model import GPT, GPTConfig
from models.llamagen.speculative import MARGIN, WINDOWS, AutoWindow, target_probs
from models.sampling import SamplerRows
from models.settings import ImageSettings, Speculative
from tests.conftest import REFERENCE


@pytest.fixture(scope="module")
def c2i():
    return load_gpt(REFERENCE / "llamagen_c2i.pt", n_head=2, image_size=256)


@pytest.fixture(scope="module")
def shapes():
    spec = next(s for s in load_config(DEFAULT_CONFIG) if s.name == "llamagen-shapes")
    return load_gpt(spec.weights, spec.arch, spec.n_head, spec.image_size, downsample=4), spec.defaults


def settings(method="none", window=16, **kw):
    return ImageSettings(speculative=Speculative(method, window), **kw)


@pytest.mark.parametrize("method, window", [("sjd", 8), ("scd", 16), ("gsd", 32)])
@pytest.mark.parametrize("which", ["fixture", "bundled"])
def test_greedy_speculation_is_greedy_decoding_token_for_token(c2i, shapes, which, method, window):
    # top_k 1 makes p one-hot: a draft passes exactly when it is the argmax, so every method must
    # give plain greedy decoding, guided (cfg 4, the null row fed the same drafts) or not. The
    # fixture's random weights hang on the last token, so Jacobi drafts seldom survive there; the
    # bundled model accepts many of them (the c2i of 7000 steps: 198-214 passes for the cfg-4
    # greedy image, 59-82 for the unguided one).
    model = c2i if which == "fixture" else shapes[0]
    labels = torch.tensor([3, 7])
    plain = [settings(top_k=1, cfg=cfg) for cfg in (4.0, 1.0)]
    spec = [settings(method, window, top_k=1, cfg=cfg) for cfg in (4.0, 1.0)]
    expected = generate(model, None, labels, plain, decode=False)
    out = generate(model, None, labels, spec, decode=False)
    assert torch.equal(out.tokens, expected.tokens)
    assert out.forward_passes == max(out.passes_per_image) <= 256
    assert all(a <= d for a, d in zip(out.accepted, out.drafted, strict=True))
    if which == "bundled":
        assert max(out.passes_per_image) < 240 and min(out.passes_per_image) < 128, out.passes_per_image


# -- the model's own distribution -----------------------------------------------------------------

TINY = GPTConfig(dim=32, n_layer=2, n_head=2, ffn_hidden=64, vocab_size=16, block_size=9, num_classes=4)
SAMPLES = 4000  # seeds 0..3999 per method
CHECKED = 4  # image tokens 0..3: their exact marginals sum over 16^3 prefixes
TINY_SETTINGS = dict(cfg=2.0, top_k=12, temperature=0.9)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        model.output.weight.mul_(6.0)  # peaked enough that drafts are often accepted
    return model


@torch.inference_mode()
def exact_marginals(model: GPT, label: int) -> torch.Tensor:
    """(CHECKED, V): the marginal of image tokens 0..CHECKED-1 under the guided, warped model, by
    summing over every prefix (teacher-forced forward, both guidance rows)."""
    V = model.config.vocab_size
    prefixes = torch.tensor(list(itertools.product(range(V), repeat=CHECKED - 1)))  # (V^3, 3)
    n = len(prefixes)
    cond = model(prefixes, torch.full((n,), label))[:, :CHECKED]
    null = model(prefixes, torch.full((n,), model.config.num_classes))[:, :CHECKED]
    logits = null + TINY_SETTINGS["cfg"] * (cond - null)
    sampler = SamplerRows.of([ImageSettings(**TINY_SETTINGS)] * n, "cpu")
    p = target_probs(logits, sampler)  # (n, CHECKED, V): token t given the prefix's first t tokens
    out, mass = torch.zeros(CHECKED, V), torch.ones(n)
    for t in range(CHECKED):
        out[t] = (mass[:, None] * p[:, t]).sum(0) / V ** (CHECKED - 1 - t)  # each prefix counted V^.. times
        if t < CHECKED - 1:
            mass = mass * p[torch.arange(n), t, prefixes[:, t]]
    return out


def chi_square(tokens: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of token counts against probabilities p (V,), cells with an expected
    count under 5 pooled; -> (statistic, degrees of freedom)."""
    counts = torch.bincount(tokens, minlength=len(p)).double()
    expected = p.double() * len(tokens)
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.fixture(scope="module")
def exact(tiny):
    return exact_marginals(tiny, 1)


@pytest.mark.parametrize("method, window", [("none", 1), ("sjd", 4), ("scd", 4), ("scd", 8)])
def test_sampled_tokens_follow_the_models_own_distribution(tiny, exact, method, window):
    # 4000 fixed seeds, so the test is deterministic. Per position, Pearson's chi-square against the
    # exact marginal must stay under its 1 - 1e-4 quantile: a sampler that drew the model's
    # distribution fails that about once in 10^4 seed sets per check (16 checks here); the lossy
    # configuration below, which accepts every draft, exceeds it by far.
    params = [settings(method, window, seed=s, **TINY_SETTINGS) for s in range(SAMPLES)]
    out = generate(tiny, None, torch.full((SAMPLES,), 1), params, decode=False)
    if method != "none":
        assert sum(out.accepted) > SAMPLES / 2  # drafts were accepted, often
    for t in range(CHECKED):
        stat, dof = chi_square(out.tokens[:, t], exact[t])
        assert stat < chi2.ppf(1 - 1e-4, dof), (t, stat, dof)


def test_the_check_detects_a_biased_sampler(tiny, exact):
    # GSD with a group of every token and no filters accepts every draft: far from the model
    lossy = Speculative("gsd", 4, group=16, p_threshold=1.0, distance=1e9)
    params = [ImageSettings(seed=s, speculative=lossy, **TINY_SETTINGS) for s in range(SAMPLES)]
    out = generate(tiny, None, torch.full((SAMPLES,), 1), params, decode=False)
    stats = [chi_square(out.tokens[:, t], exact[t]) for t in range(1, CHECKED)]
    assert any(stat > 10 * chi2.ppf(1 - 1e-4, dof) for stat, dof in stats), stats


# -- batches, guidance, previews ------------------------------------------------------------------


def mixed_batch() -> tuple[torch.Tensor, list[ImageSettings]]:
    """Labels and settings of every method beside a plain image, each sampling knob somewhere."""
    return torch.tensor([1, 2, 3, 4]), [
        settings("sjd", 8, seed=10, cfg=4.0, top_k=100),
        settings("scd", 16, seed=11, cfg=1.0, top_p=0.9, cfg_interval=100),
        settings("gsd", 4, seed=12, cfg=2.0, temperature=0.8),
        settings("none", seed=13, cfg=4.0),
    ]


def test_an_image_does_not_depend_on_its_batch(shapes):
    model = shapes[0]
    labels, params = mixed_batch()
    batch = generate(model, None, labels, params, decode=False)
    for i in (0, 1, 2, 3):
        alone = generate(model, None, labels[i : i + 1], [params[i]], decode=False)
        assert torch.equal(batch.tokens[i], alone.tokens[0]), i
        assert batch.passes_per_image[i] == alone.passes_per_image[0], i
    plain = generate(model, None, labels[3:], [settings(seed=13, cfg=4.0)], decode=False)
    assert torch.equal(batch.tokens[3], plain.tokens[0])  # the plain image is plain decoding's
    assert batch.passes_per_image[3] == 256


def test_the_reference_kernels_a_gpu_runs_commit_the_c_kernels_tokens(shapes, monkeypatch):
    """Off the CPU, drafting, targets, verification and the plain draw run kernels/speculative.py's
    PyTorch references (written to read nothing back from the device): a mixed batch of every
    method beside a plain image gives the same tokens and passes through them as through C."""
    model = shapes[0]
    labels, params = mixed_batch()
    native = generate(model, None, labels, params, decode=False)
    for kernel in (
        "_commit_kernel",
        "_fill_kernel",
        "_grouped_kernel",
        "_target_probs_kernel",
        "_sample_kernel",
    ):
        monkeypatch.setattr(ks, kernel, lambda: None)
    reference = generate(model, None, labels, params, decode=False)
    assert torch.equal(reference.tokens, native.tokens)
    assert reference.passes_per_image == native.passes_per_image
    assert max(native.passes_per_image[:3]) < 200  # the windows did speculate


def test_rows_are_reported_once_each_in_order(shapes):
    steps = []
    out = generate(
        shapes[0],
        None,
        torch.tensor([5, 6]),
        [settings("scd", 32, seed=s, top_k=1) for s in (0, 1)],
        on_row=steps.append,
        decode=False,
    )
    assert [s.index for s in steps] == list(range(16)) and {s.total for s in steps} == {16}
    assert [s.tokens.shape for s in steps] == [(2, 16 * (i + 1)) for i in range(16)]
    assert torch.equal(steps[-1].tokens, out.tokens)
    assert out.forward_passes < 128  # ... so many passes completed more than a row's worth


# -- the auto window ------------------------------------------------------------------------------


class Calibrated(AutoWindow):
    """Pass costs and tokens per pass given, none measured."""

    def __init__(self, model, seconds, tokens):
        super().__init__(model)
        self.fixed_seconds, self.fixed_tokens = seconds, tokens

    def pass_seconds(self, rows, L):
        return self.fixed_seconds(L)

    def record_pass(self, rows, L, seconds):
        pass

    def tokens_per_pass(self, method, L):
        return self.fixed_tokens(L)

    def calibrated(self, method):
        return True


def test_auto_falls_back_to_plain_decoding_where_speculation_loses(shapes):
    model = shapes[0]
    labels, params = torch.tensor([2]), [settings("scd", "auto", seed=4, cfg=2.0, top_k=20)]
    # a window of L costs L passes and commits fewer than L tokens: plain decoding wins
    losing = Calibrated(model, lambda L: L, lambda L: 1 if L == 1 else L / 2)
    out = generate(model, None, labels, params, decode=False, auto=losing)
    assert out.forward_passes == 256 and out.drafted == [0]
    plain = generate(model, None, labels, [settings(seed=4, cfg=2.0, top_k=20)], decode=False)
    assert torch.equal(out.tokens, plain.tokens)  # at window 1, exactly plain decoding's draws
    free = Calibrated(model, lambda L: 1.0, lambda L: 1 if L == 1 else L / 2)  # the widest wins
    assert generate(model, None, labels, params, decode=False, auto=free).forward_passes < 100


class FreeWidth(AutoWindow):
    """Measures pass costs as the real one does, but chooses as if every width cost one pass: the
    window is then the one that commits the most tokens per pass, whatever this machine's timings."""

    def pass_seconds(self, rows, L):
        super().pass_seconds(rows, L)
        return 1.0


def test_auto_counts_a_ragged_pass_by_its_tokens(shapes):
    """Beside seven plain guided images (14 rows), an auto image (2 rows) at window 16 puts 46
    tokens through the layers, not 16 x 16: counted so, a window whose full pass is dear can still
    pay for itself in company, where counting every row at the width (the padded pass) says no.
    Alone, the two counts agree."""
    auto = Calibrated(
        shapes[0], lambda L: 1.0 + 0.16 * (L - 1), lambda L: 1.0 if L == 1 else min(L, 16) / 2.3
    )
    auto.probe = lambda: None
    assert auto.ragged_seconds(16, 16, 16 * 16) == pytest.approx(auto.pass_seconds(16, 16))
    assert auto.ragged_seconds(16, 16, 16) == pytest.approx(auto.pass_seconds(16, 1))
    assert auto.ragged_seconds(16, 16, 46) == pytest.approx(1.0 + 2.4 * 30 / 240)
    assert auto.choose(16, ["scd"], 1, others=7) == 1  # every row at the width: 13.96 tokens / 3.4 s
    assert auto.choose(16, ["scd"], 1, others=7, auto_rows=2, company_tokens=14) == 16  # / 1.3 s
    for L in (2, 8, 16):  # alone, a ragged count of every row at the width is the padded one
        assert auto.ragged_seconds(2, L, 2 * L) == pytest.approx(auto.pass_seconds(2, L))


def test_the_engine_tells_auto_its_images_rows_and_the_companys_tokens(shapes, monkeypatch):
    model, defaults = shapes
    asked = []
    auto = Calibrated(model, lambda L: 1.0, lambda L: 1.0 if L == 1 else 2.0)
    monkeypatch.setattr(auto, "choose", lambda *a, **k: asked.append((a, k)) or 1)
    labels = torch.tensor([1, 2, 3])
    params = [
        settings("scd", "auto", seed=1, cfg=2.0),
        settings("sjd", 4, seed=2, cfg=2.0),
        settings(seed=3, cfg=2.0),
    ]
    generate(model, None, labels, params, decode=False, auto=auto)
    ((args, kw),) = asked
    assert args == (6, ["scd"], 4, 2)  # three guided images; the company's widest window is 4
    assert kw == {"auto_rows": 2, "company_tokens": 2 * 4 + 2 * 1}


def test_auto_calibrates_once_per_method_and_keeps_measuring(shapes):
    model = shapes[0]
    auto = FreeWidth(model, repeats=1)

    def one_auto_image(label, seed):
        params = [settings("scd", "auto", seed=seed, cfg=2.0, top_k=20)]
        return generate(model, None, torch.tensor([label]), params, decode=False, auto=auto)

    first = one_auto_image(1, seed=5)
    assert auto.calibrated("scd") and not auto.calibrated("sjd")
    assert all(auto.tokens_per_pass("scd", L) > 1 for L in WINDOWS[1:])
    assert set(auto.forward) == {2}  # one guided image: 2 rows, measured once
    assert first.forward_passes < 256 and first.drafted[0] > 0
    chosen = auto.choose(2, ["scd"], 1)
    assert chosen > 1
    calibrated = dict(auto.tokens)
    second = one_auto_image(3, seed=6)
    assert second.forward_passes < 256 and second.drafted[0] > 0
    # the finished image updated its window's tokens per pass, and only that one
    assert {k for k in calibrated if auto.tokens[k] != calibrated[k]} == {("scd", chosen)}


def test_calibration_counts_every_width_alike_plain_decoding_included(shapes):
    """Each width's first estimate is its mid-image forward plus the mean overhead of its passes over
    the calibration image, plain decoding's passes too: with passes that cost the forward plus a
    per-row overhead and drift over the image (cheap early, dear late, zero on average), calibration
    finds the overhead, and the prior of a batch it never saw counts plain decoding's glue as well.
    (Before, window 1 had no overhead, and a width's cost was its running mean, i.e. the image's end.)"""
    model = shapes[0]
    auto = AutoWindow(model, repeats=1)
    forward = {L: 1e-3 * L for L in WINDOWS}
    auto._measure = lambda rows: dict(forward)
    auto.probe = lambda: None  # the machine's speed holds
    per_row = {L: 2e-4 * (1 + L) for L in WINDOWS}

    def run_alone(s):
        L, rows, passes = s.speculative.window, 2, 1 + 255 // s.speculative.window
        for k in range(passes - 1):
            drift = 5e-4 * (2 * k / (passes - 2) - 1)  # -0.5 ms at the first pass .. +0.5 ms at the last
            auto.record_pass(rows, L, forward[L] + rows * per_row[L] + drift)
        return passes, rows

    auto.calibrate(settings("scd", "auto"), run_alone)
    assert auto.overhead == pytest.approx(per_row, rel=1e-6)
    for L in WINDOWS:
        assert auto.pass_seconds(2, L) == pytest.approx(forward[L] + 2 * per_row[L], rel=1e-6)
        assert auto.pass_seconds(4, L) == pytest.approx(forward[L] + 4 * per_row[L], rel=1e-6)


def test_widths_are_compared_by_the_mean_of_their_passes_at_one_machine_speed(shapes):
    """Passes cost more late in an image (their attention reads more keys) and the last ones are
    narrow: widths are compared by their passes' mean over whole images. (A running mean of weight
    0.1 ended each image near its last passes' cost and chose losing windows.) Passes timed while
    the machine is slower (`load`, which each choice probes) count at its speed, so a slow spell
    moves every width's estimate alike, whichever width ran through it."""
    auto = AutoWindow(shapes[0], repeats=1)
    auto._measure = lambda rows: {L: 1e-3 for L in WINDOWS}
    auto.probe = lambda: None  # the speed is set by hand below
    assert auto.pass_seconds(2, 4) == auto.pass_seconds(2, 1) == 1e-3  # the priors, before any pass

    def image(L, mean):  # 16 timed passes from mean / 2 to 3 mean / 2, dearest at the end
        for k in range(16):
            auto.record_pass(2, L, mean * (0.5 + k / 15))

    for _ in range(12):
        image(4, 2e-3)
    assert auto.pass_seconds(2, 4) == pytest.approx(2e-3, rel=0.05)  # the mean, not the end
    auto.load = 1.5  # the machine slows down by half (as a probe would find) ...
    for _ in range(40):  # ... while only plain images run
        image(1, 1.5e-3)
    assert auto.pass_seconds(2, 1) == pytest.approx(1.5e-3, rel=0.05)
    assert auto.pass_seconds(2, 4) == pytest.approx(3e-3, rel=0.05)  # slowed alike, though it never ran
    auto.load = 1.0
    assert auto.pass_seconds(2, 1) == pytest.approx(1e-3, rel=0.05)  # and back
    assert auto.pass_seconds(4, 1) == 1e-3  # other row counts keep their own prior


def test_a_slow_spell_of_plain_passes_does_not_make_a_losing_window_look_faster(shapes, monkeypatch):
    """Plain passes timed in a busy minute against a window's estimate from a quiet one made `auto`
    switch to the window (measured: plain 0.25 then 0.37 ms, window 4 kept at 0.6 ms; auto at 0.77-
    0.87x of plain decoding). Counted at the speed the probe finds, they do not."""
    auto = AutoWindow(shapes[0], repeats=1)
    auto._measure = lambda rows: {1: 0.25e-3, 2: 0.45e-3, 4: 0.6e-3, 8: 0.8e-3, 16: 1.3e-3, 32: 2.1e-3}
    speed = [1.0]
    auto.probe = lambda: setattr(auto, "load", speed[0])
    monkeypatch.setattr(speculative, "PROBE_EVERY_S", 0.0)  # every choice probes
    auto.tokens.update(
        {("scd", L): t for L, t in zip(WINDOWS[1:], (1.4, 1.97, 2.33, 3.11, 4.57), strict=True)}
    )
    assert auto.choose(2, ["scd"], 1) == 1
    speed[0] = 1.8
    assert auto.choose(2, ["scd"], 1) == 1
    for _ in range(8):  # images of plain passes at 0.45 ms: the machine is 1.8x slower
        for _ in range(32):
            auto.record_pass(2, 1, 0.45e-3)
    assert auto.choose(2, ["scd"], 1) == 1
    assert auto.pass_seconds(2, 1) == pytest.approx(0.45e-3, rel=0.02)
    # ... where window 4 would be chosen against plain passes counted at their own slow time:
    assert 1.97 / 0.6e-3 / MARGIN > 1 / 0.45e-3


def test_choices_and_passes_probe_the_speed_once_a_second(shapes, monkeypatch):
    # the calls below take milliseconds; a probe period of an hour keeps a stalled machine's
    # second from counting as the next probe's
    monkeypatch.setattr(speculative, "PROBE_EVERY_S", 3600.0)
    auto = AutoWindow(shapes[0], repeats=1)
    auto._measure = lambda rows: {L: 1e-3 * L for L in WINDOWS}
    auto.tokens.update({("scd", L): L / 2 for L in WINDOWS[1:]})
    probed = []

    def probe():
        probed.append(1)
        auto._probed_at = time.monotonic()

    auto.probe = probe
    for rows in (2, 2, 16, 2):
        auto.choose(rows, ["scd"], 1)
        auto.record_pass(rows, 1, 1e-3)
    assert len(probed) == 1  # within the period of each other
    auto._probed_at -= speculative.PROBE_EVERY_S
    auto.record_pass(2, 1, 1e-3)
    assert len(probed) == 2


def test_a_probe_measures_the_speed_against_its_first_measurement(shapes, monkeypatch):
    # a clock that a forward advances by `cost`; in the second probe one forward of three is a burst
    clock, cost, calls = [0.0], [1e-3], [0]

    def forward(*args):
        calls[0] += 1
        clock[0] += cost[0] * (5 if calls[0] == 6 else 1)  # call 1 warms up, 2-4 the first probe

    monkeypatch.setattr(speculative, "device_clock", lambda device: clock[0])
    auto = AutoWindow(shapes[0], repeats=1)
    monkeypatch.setattr(auto.model, "decode_step", forward)
    auto.probe()
    assert auto.load == 1.0  # the first probe is the reference
    cost[0] = 1.5e-3
    auto.probe()
    assert calls[0] == 7
    assert auto.load == pytest.approx(1.5)  # the median: a burst in one forward does not count


# -- the bundled model ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sjd", "scd", "gsd"])
def test_speculation_takes_far_fewer_passes_on_the_bundled_model(shapes, method):
    model, defaults = shapes
    params = [
        settings(method, 16, seed=s, cfg=defaults.cfg, top_k=defaults.top_k, top_p=defaults.top_p)
        for s in range(2)
    ]
    out = generate(model, None, torch.tensor([0, 4]), params, decode=False)
    # measured: about 95 (SJD), 80 (SCD), 70 (GSD) passes per image at window 16, against 256
    assert max(out.passes_per_image) < 160, out.passes_per_image
