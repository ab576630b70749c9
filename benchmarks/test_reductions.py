"""The affinity step's reductions (``mtdl_fast.reductions``: the C++/CUDA extension and its PyTorch twin)
against the plain training step they ride along with (K = 10, ResNet-8: the affinity benchmark's
problem) on ``--device`` (cpu by default; ``make gpu-check`` passes cuda). Guard: the extension equals
the twin (affinity_moments to the last bit, gram to float64 rounding). Target: under 1% of a plain step.
The Gram matrix's floor: reading the (K, P) float32 gradients once at the measured copy bandwidth."""
import pytest
import torch

from benchmarks import affinity, common
from mtdl_fast import reductions

K = 10
CONTENDERS = ["plain step", "affinity_moments", "affinity_moments (torch twin)", "gram", "gram (torch twin)"]


def _affinity_moments_args(device: torch.device):
    """Fresh positive base (K,) and lookahead (K, K) losses, zero count and moments, the EMA's decay."""
    gen = torch.Generator().manual_seed(2)
    base, lookahead = ((torch.rand(s, generator=gen, dtype=torch.float64) + 1.5).to(device) for s in ((K,), (K, K)))
    count = torch.zeros(K, K, dtype=torch.int64, device=device)
    moments = torch.zeros(4, K, K, dtype=torch.float64, device=device)
    return base, lookahead, count, moments, 0.9


@pytest.mark.parametrize("contender", CONTENDERS)
def test_reductions(benchmark, device: torch.device, quick: bool, contender: str) -> None:
    trunk, heads, views, labels = affinity.make_problem(4 if quick else 64, K, device)
    grads = torch.randn(K, sum(p.numel() for p in trunk.parameters()), device=device)
    backend = "torch" if contender.endswith("(torch twin)") else "extension"
    info = {"case": f"K={K}, gradients {K} x {grads.shape[1]}", "contender": contender}
    if contender == "plain step":
        fn = affinity.plain_step(trunk, heads, views, labels)
        info["role"] = "reference"
    elif reductions._compiled_for(device) is None:
        pytest.skip(f"mtdl_fast._C is not built for {device}")
    elif contender.startswith("affinity_moments"):
        states = {name: _affinity_moments_args(device) for name in ("extension", "torch")}
        for _ in range(3):  # a few steps, so the guard sees the update of a non-zero state
            for name, state in states.items():
                reductions.affinity_moments(*state, backend=name)
        same = all(torch.equal(a, b) for a, b in zip(states["extension"][2:4], states["torch"][2:4]))
        assert same, "affinity_moments: the extension and the twin differ"
        args = _affinity_moments_args(device)
        fn = lambda: reductions.affinity_moments(*args, backend=backend)  # noqa: E731
        info["note"] = "extension == twin, to the last bit"
    else:
        fn = lambda: reductions.gram(grads, backend=backend)  # noqa: E731
        torch.testing.assert_close(reductions.gram(grads, backend="extension"), reductions.gram(grads, backend="torch"),
                                   rtol=1e-12, atol=0)
        info.update(note="extension == twin (rtol 1e-12)", bytes=grads.numel() * 4,
                    floor_s=grads.numel() * 4 / (common.copy_gbps(device) * 1e9))
    if backend == "extension" and contender != "plain step":
        info["target"] = "<= 0.01x ref"
    benchmark.group = f"reductions ({device.type})"
    benchmark.extra_info.update(info)
    benchmark(fn)
