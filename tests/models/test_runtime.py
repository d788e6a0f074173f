"""Thread-level device settings (no GPU here: what they ask of torch.cuda is recorded)."""

import torch

from models.runtime import use_device


def test_a_thread_serving_a_numbered_gpu_makes_it_its_current_device(monkeypatch):
    # Triton launches on the calling thread's current device: a worker for cuda:1 must say so
    asked = []
    monkeypatch.setattr(torch.cuda, "set_device", asked.append)
    for device in ("cpu", "cuda", "cuda:1", torch.device("cuda", 2)):
        use_device(device)
    assert asked == [torch.device("cuda", 1), torch.device("cuda", 2)]
