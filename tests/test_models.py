import pytest
import torch

from ltdd_fast.errors import ConfigError
from ltdd_fast.models import MODELS, ConvNet, convnet_depth, functional_model, get_network

SHAPES = [(3, (32, 32)), (1, (8, 8))]


def _skip_if_too_small(name, im_size):
    if name.startswith("convnet") and name[-1].isdigit() and 2 ** int(name[-1]) > min(im_size):
        pytest.skip(f"{name} needs sides >= {2 ** int(name[-1])}")


def _count(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("im_size,depth,backbone", [((32, 32), 3, 299_520), ((64, 64), 4, 447_360)])
def test_convnet_parameter_counts(im_size, depth, backbone):
    net = get_network("convnet", 3, 10, im_size)
    assert net.depth == depth
    assert _count(net.features.parameters()) == backbone
    fnet = functional_model("convnet", 3, 10, im_size)
    assert fnet.classifier_offset == backbone
    assert fnet.num_params == _count(net.parameters())
    assert fnet.feature_dim == 128 * 4 * 4
    assert fnet.backbone_mask().sum() == backbone


@pytest.mark.parametrize("side,depth", [(2, 1), (4, 2), (8, 2), (16, 2), (28, 3), (32, 3), (64, 4), (128, 5)])
def test_convnet_depth(side, depth):
    assert convnet_depth((side, side)) == depth
    net = ConvNet(1, 3, (side, side), width=4)
    assert net(torch.randn(2, 1, side, side)).shape == (2, 3)


def test_classifier_offset_derived_not_fixed():
    # the offset follows the model: width, channels and depth all move it
    f = functional_model("convnet2", 1, 7, (16, 16), width=8)
    assert f.classifier_offset == (1 * 8 * 9 + 8 + 16) + (8 * 8 * 9 + 8 + 16)
    assert f.num_params == f.classifier_offset + 8 * 4 * 4 * 7 + 7


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channel,im_size", SHAPES)
def test_classifier_is_last(name, channel, im_size):
    _skip_if_too_small(name, im_size)
    net = get_network(name, channel, 5, im_size)
    names = [n for n, _ in net.named_parameters()]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    assert list(net.parameters())[-2] is net.classifier.weight
    f = functional_model(name, channel, 5, im_size)
    assert f.param_names == names
    assert f.classifier_offset == f.num_params - net.classifier.weight.numel() - 5


def _compare(name, channel, im_size, norm="instancenorm", width=128):
    torch.manual_seed(0)
    f = functional_model(name, channel, 4, im_size, width=width, norm=norm)
    module = f.make_module().double().train()
    flat = f.flatten_module(module).requires_grad_(True)
    x = torch.randn(3, channel, *im_size, dtype=torch.float64)
    weights = torch.randn(3, 4, dtype=torch.float64)

    xm = x.clone().requires_grad_(True)
    out_m = module(xm)
    gm = torch.autograd.grad((out_m * weights).sum(), [xm, *module.parameters()])
    xf = x.clone().requires_grad_(True)
    out_f = f(flat, xf)
    gx, gflat = torch.autograd.grad((out_f * weights).sum(), [xf, flat])

    torch.testing.assert_close(out_f, out_m, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gm[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gflat, torch.cat([g.reshape(-1) for g in gm[1:]]), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(f.features(flat, x), module.features(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channel,im_size", SHAPES)
def test_functional_matches_module(name, channel, im_size):
    _skip_if_too_small(name, im_size)
    _compare(name, channel, im_size)


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
@pytest.mark.parametrize("channel,im_size", SHAPES)
def test_functional_matches_module_batchnorm(name, channel, im_size):
    _compare(name, channel, im_size, norm="batchnorm", width=32)


def test_functional_forward_leaves_no_state():
    f = functional_model("resnet18", 1, 3, (8, 8), width=16, norm="batchnorm")
    flat = f.init_flat(torch.Generator().manual_seed(0))
    x = torch.randn(4, 1, 8, 8)
    a, b = f(flat, x), f(flat, x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_flatten_unflatten_load_round_trip(name):
    f = functional_model(name, 3, 10, (32, 32), width=32)
    module = f.make_module()
    flat = f.flatten_module(module)
    assert flat.shape == (f.num_params,)
    params = f.unflatten(flat)
    assert list(params) == f.param_names
    for (n, p), shape in zip(module.named_parameters(), f.param_shapes):
        assert torch.equal(params[n], p) and tuple(p.shape) == shape
    other = f.make_module()
    new = torch.randn(f.num_params)
    f.load_into(other, new)
    assert torch.equal(f.flatten_module(other), new)
    # unflatten gives views: gradients reach the flat vector
    new.requires_grad_(True)
    f.unflatten(new)["classifier.bias"].sum().backward()
    assert new.grad[f.num_params - 10 :].eq(1).all() and new.grad[: f.num_params - 10].eq(0).all()


@pytest.mark.parametrize("name", MODELS)
def test_init_flat_deterministic(name):
    f = functional_model(name, 1, 3, (32, 32) if name in ("convnet4", "convnet5") else (8, 8), width=16)
    a = f.init_flat(torch.Generator().manual_seed(1))
    b = f.init_flat(torch.Generator().manual_seed(1))
    c = f.init_flat(torch.Generator().manual_seed(2))
    assert a.dtype == torch.float32 and a.shape == (f.num_params,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the global RNG is not consumed
    state = torch.random.get_rng_state()
    f.init_flat(torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.random.get_rng_state())
    # default init: norm weights are ones, so the flat vector has the module's structure
    module = f.make_module()
    f.load_into(module, a)
    for n, p in module.named_parameters():
        assert torch.isfinite(p).all(), n


def test_double_backward_matches_finite_differences():
    torch.manual_seed(0)
    f = functional_model("convnet", 1, 3, (8, 8), width=8)
    flat = f.init_flat(torch.Generator().manual_seed(0)).double()
    v = torch.randn(f.num_params, dtype=torch.float64)
    y = torch.tensor([0, 2])

    def vg(x):
        # v . d loss / d flat, as the second pass of the constant-memory gradient computes it
        theta = flat.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(f(theta, x), y)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        return (v * g).sum()

    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(vg(x), x)
    assert torch.isfinite(dx).all() and dx.abs().sum() > 0
    assert torch.autograd.gradcheck(vg, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradgradcheck_convnet():
    f = functional_model("convnet1", 1, 2, (4, 4), width=2)
    flat = f.init_flat(torch.Generator().manual_seed(0)).double().requires_grad_(True)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(f.forward, (flat, x))


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="convnet"):
        get_network("lenet", 3, 10, (32, 32))
    with pytest.raises(ConfigError, match="lenet"):
        functional_model("lenet", 3, 10, (32, 32))
    with pytest.raises(ConfigError, match="layernorm"):
        get_network("vgg11", 3, 10, (32, 32), norm="layernorm")
    with pytest.raises(ConfigError, match="batchnorm"):
        get_network("alexnet", 3, 10, (32, 32), norm="batchnorm")
    # the ConvNets take batch norm (the uni-level distiller's observer): one BN layer per block
    bn = get_network("convnet", 3, 10, (32, 32), width=4, norm="batchnorm")
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == 3
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in bn.modules())
    with pytest.raises(ConfigError, match="too small"):
        get_network("convnet4", 3, 10, (8, 8))
    with pytest.raises(ConfigError, match="num_classes"):
        get_network("convnet", 3, 0, (32, 32))


def test_bad_inputs_raise_value_error():
    f = functional_model("convnet", 3, 10, (32, 32), width=8)
    flat = f.init_flat()
    with pytest.raises(ValueError, match="flat"):
        f(flat[:-1], torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="x has shape"):
        f(flat, torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="does not match"):
        f.flatten_module(get_network("convnet", 3, 10, (32, 32)))
