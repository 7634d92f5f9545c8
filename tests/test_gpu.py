"""The device path: train steps per loss with AMP, exact resume, and the same /generate bytes on two replicas.

Marked `gpu` and run on CUDA (skipped where there is no GPU); AIGC_RAY_DEVICE=cpu runs the same checks on
the CPU, as `bench/gpu_check.sh --cpu-smoke` does to prove the script works on a machine without one."""

import os

import pytest
import torch

from aigc_ray import data, train
from aigc_ray.plan import resolve
from aigc_ray.gan.losses import LOSSES
from aigc_ray.gan.step import build_state, load_state_dict, state_dict, train_step

DEVICE = os.environ.get("AIGC_RAY_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no GPU here")]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_train_steps_with_amp_on_the_device(tiny, loss, amp):
    cfg = resolve(tiny(loss__name=loss, train__amp=amp), channels=1, num_classes=10)
    state = build_state(cfg, DEVICE)
    assert next(state.g.parameters()).device.type == torch.device(DEVICE).type
    batches = data.Batches(data.load(cfg.data), 16, seed=0, device=DEVICE)
    g0 = [p.detach().clone() for p in state.g.parameters()]
    for _ in range(3):
        stats = train_step(state, batches, cfg)
    assert all(torch.isfinite(v).all() for v in stats.values()), stats
    assert any(not torch.equal(a, b) for a, b in zip(g0, state.g.parameters()))
    assert state.scaler_g.is_enabled() == (amp == "fp16")


def test_resume_is_exact_on_the_device(tiny):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cfg = resolve(tiny(train__amp="bf16"), channels=1, num_classes=10)
    ds = data.load(cfg.data)

    def run(steps, sd=None):
        state = build_state(cfg, DEVICE)
        if sd is not None:
            load_state_dict(state, sd)
        batches = data.Batches(ds, 16, seed=0, start=state.step * cfg.loss.n_critic, device=DEVICE)
        while state.step < steps:
            train_step(state, batches, cfg)
        return state

    straight, half = run(6), state_dict(run(4))
    resumed = run(6, half)
    for a, b in zip(straight.g.parameters(), resumed.g.parameters()):
        assert torch.equal(a, b)


def test_generate_gives_the_same_bytes_on_two_replicas(ray_cluster, tiny, bytes_by_replica):
    from ray import serve

    from aigc_ray.ingress import free_ports
    from aigc_ray.serve import ServeArgs, build_app

    checkpoint = train.fit(tiny(train__steps=2), quiet=True)["checkpoint"]
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeArgs(checkpoint=checkpoint), min_replicas=2, max_replicas=2, num_cpus=0.25,
                        num_gpus=0.5 if DEVICE == "cuda" else 0), name="replicas", route_prefix="/")
    try:
        by_replica = bytes_by_replica(f"http://127.0.0.1:{port}")
        assert len(by_replica) == 2, by_replica.keys()  # both replicas answered
        assert len(set().union(*by_replica.values())) == 1  # with the very same bytes
    finally:
        serve.shutdown()  # the app with it
