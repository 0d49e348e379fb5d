"""The memory planner: sizes, the CPU peak measure, plans that fit their budget and refusals when nothing fits."""
import pytest
import torch

from ltdd_fast import checks, matching, memory, ops, phases
from ltdd_fast.errors import ConfigError
from ltdd_fast.models.functional import functional_model

pytestmark = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="ltdd_fast._C not built")


@pytest.mark.parametrize("text, want", [("24GB", 24 * 10**9), ("24 GiB", 24 * 2**30), ("512MB", 512 * 10**6),
                                        ("1e9", 10**9), ("1.5gb", 1.5e9)])
def test_parse_bytes(text, want):
    assert checks.parse_bytes(text) == int(want)


@pytest.mark.parametrize("text", ["", "lots", "24 parsecs", "-3GB", "0GB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ConfigError, match="is not a size"):
        checks.parse_bytes(text)


def test_peak_bytes_counts_what_is_held_at_once():
    def work():
        a = torch.empty(1_000_000)          # 4 MB
        b = torch.empty(2_000_000)          # 8 MB: 12 MB held
        del a
        c = torch.empty(500_000)            # 2 MB: 10 MB held
        return b, c
    (b, c), peak = memory.peak_bytes(work, "cpu")
    assert peak == 12_000_000


def test_reserved_bytes_is_zero_off_cuda():
    assert memory.reserved_bytes("cpu") == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reserved_bytes_counts_a_cuda_graph_pool_whole():
    """A CUDA graph's intermediate, freed during capture, keeps its block in the graph's private pool: reserved,
    not allocated. reserved_bytes (what bench e2e's fast_held_bytes measures) counts it; memory_allocated does not."""
    dev = torch.device("cuda")
    x = torch.randn(1 << 20, device=dev)   # 4 MB
    (x * 2 + 1).sum()                      # warm-up outside the capture
    before, allocated = memory.reserved_bytes(dev), torch.cuda.memory_allocated(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t = x * 2
        out = t + 1
        del t
    graph.replay()
    held = memory.reserved_bytes(dev) - before
    assert held >= 2 * x.numel() * x.element_size()                     # t's block and out's
    assert torch.cuda.memory_allocated(dev) - allocated < held           # out alone is allocated
    assert torch.equal(out, x * 2 + 1)


def _setup(batch=8, images_per_class=4, num_classes=4):
    net = functional_model("convnet2", 1, num_classes, (8, 8), width=16)
    g = torch.Generator().manual_seed(0)
    m = images_per_class * num_classes
    images = torch.randn(m, 1, 8, 8, generator=g)
    labels = torch.randn(m, num_classes, generator=g)
    theta_0 = net.init_flat(g)
    phase = phases.Phase(theta_0=theta_0, theta_T=theta_0 + 0.01,
                            batches=[torch.randperm(m, generator=g)[:batch] for _ in range(3)])
    return net, images, labels, phase


def test_plan_fits_its_budget_when_measured():
    """The plan's chunk runs within the budget it was given (measured: the tensors live before the call plus the
    call's peak), a smaller budget gives a smaller chunk, and a large one no chunking."""
    net, images, labels, phase = _setup()
    alpha = torch.tensor(0.01)
    state = memory.state_bytes(images.shape[0], images[0].numel(), labels.shape[1], net.num_params, 1, phases=1)
    roomy = memory.plan(10**10, net, images.shape[0], labels.shape[1], 8, 3, phases=1)
    assert roomy.chunk == 8 and roomy.precision == "full"
    per_image, fixed = memory.measure_piece(net, labels.shape[1], "forward", "full", "cpu")
    budget = int(state + fixed + 3.5 * per_image)  # room for 3 images per piece
    tight = memory.plan(budget, net, images.shape[0], labels.shape[1], 8, 3, second_pass="forward", phases=1)
    assert tight.chunk == 3 and tight.predicted_bytes <= budget
    assert "chunks of 3 images" in tight.describe() and "CUDA-graph" not in tight.describe()
    graphs = memory.plan(budget, net, images.shape[0], labels.shape[1], 8, 3, second_pass="forward", phases=1,
                         compile="reduce-overhead")
    assert graphs.chunk == tight.chunk and "compile=reduce-overhead keeps CUDA-graph memory" in graphs.describe()
    capped = memory.plan(10**10, net, images.shape[0], labels.shape[1], 8, 3, phases=1, max_chunk=3)
    assert capped.chunk == 3 and capped.predicted_bytes < roomy.predicted_bytes  # the peak of the chunk it runs
    _, peak = memory.peak_bytes(lambda: matching.two_pass_gradients(
        net, images, labels, alpha, phase, None, second_pass="forward", chunk=tight.chunk), "cpu")
    live = sum(t.numel() * t.element_size() for t in (images, labels, phase.theta_0, phase.theta_T))
    assert live + peak <= budget
    _, unchunked = memory.peak_bytes(lambda: matching.two_pass_gradients(
        net, images, labels, alpha, phase, None, second_pass="forward"), "cpu")
    assert unchunked > peak  # the chunk is what made it fit


def test_plan_falls_back_to_bf16_then_refuses():
    net, images, labels, phase = _setup()
    sizes = {"full": (1000.0, 100), "bf16": (500.0, 100)}

    def fake_measure(net, num_classes, second_pass, precision, device):
        return sizes[precision]
    state = memory.state_bytes(images.shape[0], images[0].numel(), labels.shape[1], net.num_params, 1, phases=1)
    p = memory.plan(state + 100 + 600, net, images.shape[0], labels.shape[1], 8, 3, phases=1, measure=fake_measure)
    assert (p.precision, p.chunk) == ("bf16", 1)
    with pytest.raises(ConfigError, match="nothing fits a memory budget.*full: .*bf16: "):
        memory.plan(state, net, images.shape[0], labels.shape[1], 8, 3, phases=1, measure=fake_measure)
