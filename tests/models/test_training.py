"""Training the bundled models: the drawn data, the cheap tokenizer paths, resumable runs."""

import numpy as np
import pytest
import torch
from torch import nn

from models.train import outer_levels
from models.train.common import batch_indices, train
from models.train.data import COLOUR_NAMES, SHAPE_WORDS, SHAPES, caption, make_shapes, training_caption
from models.train.var import epoch_pool


def test_shapes_are_a_function_of_the_seed():
    a, b, c = make_shapes(40, 3), make_shapes(40, 3), make_shapes(40, 4)
    assert torch.equal(a.images, b.images) and torch.equal(a.shape, b.shape)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (40, 3, 64, 64) and a.images.min() >= -1 and a.images.max() <= 1
    assert set(a.shape.tolist()) <= set(range(len(SHAPES))) and set(a.row.tolist()) <= {0, 1, 2}


def test_a_shape_is_drawn_in_its_colour_where_its_grid_cell_says():
    data = make_shapes(200, 5)
    for i in range(len(data)):
        img = data.images[i].add(1).mul(127.5)  # (3, 64, 64) 0..255
        brightness = img.sum(0)
        lit = brightness > 0.8 * brightness.max()  # inside the shape, off its soft edge
        ys, xs = lit.nonzero(as_tuple=True)
        # brightest colour of the image is the shape's
        colour = img[:, lit].mean(1)
        assert ((colour - torch.tensor(_rgb(int(data.colour[i])))).abs() < 60).all()
        cy, cx = ys.float().mean() / 64, xs.float().mean() / 64
        # the centroid lies in the named third of the frame or next to it (large shapes barely move)
        assert abs(int(cy * 3) - int(data.row[i])) <= 1 and abs(int(cx * 3) - int(data.col[i])) <= 1


def _rgb(colour: int):
    from models.train.data import COLOURS

    return COLOURS[COLOUR_NAMES[colour]]


def test_captions_name_colour_and_shape_and_vary_their_wording():
    data = make_shapes(50, 6)
    rng = np.random.default_rng(0)
    texts = [training_caption(data, i, rng) for i in range(len(data))]
    assert len(set(texts)) > 40
    for i, text in enumerate(texts):
        assert COLOUR_NAMES[int(data.colour[i])] in text
        assert any(w in text for w in SHAPE_WORDS[SHAPES[int(data.shape[i])]])
    assert caption(4, 0, None, None, None, rng, templates=("a {c} {s}",)) == "a red star"
    with_place = caption(0, 2, 1, 0, 0, rng, templates=("a {z} {c} {s} {p}",))
    assert with_place.startswith(("a large blue ", "a big blue ")) and "left" in with_place


def test_batches_are_epochs_of_permutations_and_a_function_of_the_step():
    n, bs = 10, 4
    stream = torch.cat([batch_indices(n, bs, s, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(n, bs, 3, seed=3), stream[12:16])
    assert not torch.equal(batch_indices(n, bs, 3, seed=4), stream[12:16])


def _run(tmp_path, stop_after: int | None):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    gen = torch.Generator().manual_seed(5)

    def loss_fn(idx):
        noise = torch.randn(len(idx), 1, generator=gen)  # a draw from gen, as class dropout is
        return ((model(x[idx]) - y[idx] - 0.1 * noise) ** 2).mean(), {}

    def after_step(step):
        if stop_after is not None and step == stop_after:
            raise KeyboardInterrupt  # the run is stopped here

    train(model, loss_fn, 20, 4, 9, 0.05, gen, "t", tmp_path / "t.pt", after_step=after_step, save_every=2)
    return model


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, capsys):
    straight = _run(tmp_path / "a", None)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", stop_after=4)  # steps 0..3 saved at 2 and 4; step 4 lost
    resumed = _run(tmp_path / "b", None)
    assert "resuming at step 4/9" in capsys.readouterr().out
    torch.testing.assert_close(resumed.weight, straight.weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.bias, straight.bias, rtol=0, atol=0)


def test_a_checkpoint_of_another_run_length_is_refused(tmp_path):
    _run(tmp_path, None)
    model = nn.Linear(3, 1)
    with pytest.raises(SystemExit, match="a run of 9 steps at step 9, not 5"):
        train(
            model,
            lambda i: (model(torch.ones(1, 3)).sum(), {}),
            20,
            4,
            5,
            0.1,
            torch.Generator(),
            "t",
            tmp_path / "t.pt",
        )


def test_cheap_training_paths_compute_the_served_tokenizers():
    """Training runs the fixed 64 px level as pooling and smoothing: the same maps as the modules the
    server runs (check_equivalent raises otherwise), and the same tokens for the dataset."""
    from models.llamagen.tokenizer import VQModel
    from models.train.llamagen import VQ_CONFIG, encode_dataset
    from models.train.var import VAE_CONFIG
    from models.var.tokenizer import VQVAE

    images = make_shapes(6, 7).images
    torch.manual_seed(0)
    vae, vq = VQVAE(VAE_CONFIG), VQModel(VQ_CONFIG)
    for tokenizer in (vae, vq):
        outer_levels.fix_outer_levels(tokenizer)
        outer_levels.check_equivalent(tokenizer.eval(), images)
    with torch.no_grad():
        served = torch.cat(vae.img_to_idx(images), dim=1)
        cheap = torch.cat(vae.quantize.quantize(outer_levels.encode(vae, images)), dim=1)
        assert served.shape == (6, 680) and (served == cheap).float().mean() > 0.99
        assert (encode_dataset(vq, images) == vq.encode(images)).float().mean() > 0.99


def test_a_finished_run_can_be_extended_to_more_steps(tmp_path, capsys):
    _run(tmp_path, None)  # 9 steps
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    before = model.weight.detach().clone()
    x = torch.randn(20, 3)

    def loss_fn(idx):
        return model(x[idx]).pow(2).mean(), {}

    train(model, loss_fn, 20, 4, 12, 0.05, torch.Generator(), "t", tmp_path / "t.pt", extend=True)
    assert "resuming at step 9/12" in capsys.readouterr().out
    assert not torch.equal(model.weight, before)
    with pytest.raises(SystemExit, match="not 5"):  # never below the steps already run
        train(model, loss_fn, 20, 4, 5, 0.05, torch.Generator(), "t", tmp_path / "t.pt", extend=True)


def test_a_stopped_run_can_be_carried_on_under_a_shorter_schedule(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, stop_after=4)  # a 9-step run, saved at step 4
    model = nn.Linear(3, 1)
    x = torch.randn(20, 3)

    def loss_fn(idx):
        return model(x[idx]).pow(2).mean(), {}

    train(model, loss_fn, 20, 4, 6, 0.05, torch.Generator(), "t", tmp_path / "t.pt", extend=True)
    out = capsys.readouterr().out
    assert "resuming at step 4/6" in out and "trained 6 steps" in out
    assert torch.load(tmp_path / "t.pt", weights_only=True)["steps"] == 6


def test_a_warm_start_begins_from_saved_weights_and_then_resumes_from_its_checkpoints(tmp_path, capsys):
    from models.train.common import half, save

    saved = nn.Linear(3, 1)
    save(half(saved.state_dict()), tmp_path / "w.safetensors")
    model = nn.Linear(3, 1)
    x = torch.randn(20, 3)
    seen = []

    def loss_fn(idx):
        seen.append(model.weight.detach().clone())  # the weights the first step starts from
        return model(x[idx]).pow(2).mean(), {}

    def run(steps, checkpoint="t.pt", weights="w.safetensors", **kw):
        gen = torch.Generator()
        train(
            model,
            loss_fn,
            20,
            4,
            steps,
            0.05,
            gen,
            "t",
            tmp_path / checkpoint,
            warm_start=tmp_path / weights,
            **kw,
        )

    run(3)
    assert "warm start from" in capsys.readouterr().out
    torch.testing.assert_close(seen[0], saved.weight.detach().half().float(), rtol=0, atol=0)
    run(5, extend=True)  # its checkpoint, not the file, carries it on
    assert "resuming at step 3/5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--warm-start: .*missing.safetensors is not a file"):
        run(3, checkpoint="u.pt", weights="missing.safetensors")


def test_an_oversampled_class_comes_twice_an_epoch_and_the_others_once():
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    assert torch.equal(epoch_pool(labels), torch.arange(6))
    pool = epoch_pool(labels, (2, 0))
    assert sorted(pool.tolist()) == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    assert torch.bincount(labels[pool]).tolist() == [4, 2, 4]
