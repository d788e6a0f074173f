"""Metrics that several worker threads write."""

from service.metrics import Metrics
from tests.service.harness import parse_metrics


def running(metrics: Metrics) -> float:
    return parse_metrics(metrics.render().decode())[("varserve_num_requests_running",)]


def test_requests_running_is_the_sum_over_the_workers_batches():
    # a worker per device: one batch ending must not zero the gauge while another device's runs
    metrics, gpu0, gpu1 = Metrics(), object(), object()
    metrics.set_running(gpu0, 3)
    metrics.set_running(gpu1, 2)
    assert running(metrics) == 5
    metrics.set_running(gpu0, 0)
    assert running(metrics) == 2
    metrics.set_running(gpu1, 4)
    assert running(metrics) == 4
