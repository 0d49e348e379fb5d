import pytest
import torch

from ltdd_fast.augment import DSA
from ltdd_fast.dsa_chain import FAMILIES, AugParams
from ltdd_fast.errors import ConfigError

FAMILY_NAMES = tuple(FAMILIES)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["single", "multiple"])
def test_replay_is_exact_and_seeds_differ(mode):
    dsa = DSA(mode=mode)
    x = torch.randn(6, 3, 16, 16)
    out, params = dsa(x, _gen(0))
    assert torch.equal(dsa.apply(x, params), out)
    out_same, params_same = dsa(x, _gen(0))
    assert torch.equal(out_same, out) and params_same.ops == params.ops
    outs = [dsa(x, _gen(s))[0] for s in range(1, 6)]
    assert all(not torch.equal(o, out) for o in outs)


def test_modes_choose_families():
    single, multiple = DSA(mode="single"), DSA(mode="multiple")
    chosen = set()
    for s in range(40):
        ops = single.sample(2, (8, 8), _gen(s)).ops
        assert ops in FAMILIES.values()
        chosen.add(ops)
    assert len(chosen) == len(FAMILIES)
    assert multiple.sample(2, (8, 8), _gen(0)).ops == sum(FAMILIES.values(), ())


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("shape", [(4, 3, 12, 12), (3, 1, 8, 8), (2, 3, 7, 10)])
def test_each_family_keeps_shape_and_varies_per_image(family, shape):
    dsa = DSA(family)
    x = torch.rand(*shape)
    out, params = dsa(x, _gen(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    for op in params.ops:
        assert params.tensors[op].shape[0] == shape[0]
    # per-image values, not one per batch
    draws = dsa.sample(16, shape[2:], _gen(4)).tensors[FAMILIES[family][0]].float().reshape(16, -1)
    assert draws.unique(dim=0).shape[0] > 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradcheck_per_family(family):
    dsa = DSA(family)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    params = dsa.sample(2, (6, 6), _gen(5))
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,))


def test_gradient_reaches_input_through_full_chain():
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    out, _ = DSA(mode="multiple")(x, _gen(0))
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_flip_flips():
    dsa = DSA("flip")
    x = torch.randn(4, 3, 5, 5)
    flipped = torch.tensor([True, False, True, False])
    out = dsa.apply(x, AugParams(("flip",), {"flip": flipped}))
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert torch.equal(out[~flipped], x[~flipped])
    frac = dsa.sample(1000, (5, 5), _gen(0)).tensors["flip"].float().mean()
    assert 0.4 < frac < 0.6


def test_crop_shifts_with_zero_fill():
    x = torch.arange(1, 2 * 16 + 1, dtype=torch.float32).view(2, 1, 4, 4)
    out = DSA("crop").apply(x, AugParams(("crop",), {"crop": torch.tensor([[1, 0], [0, -2]])}))
    assert torch.equal(out[0, :, 1:], x[0, :, :-1]) and out[0, :, 0].eq(0).all()
    assert torch.equal(out[1, :, :, :2], x[1, :, :, 2:]) and out[1, :, :, 2:].eq(0).all()
    shifts = DSA("crop").sample(500, (32, 32), _gen(0)).tensors["crop"]
    assert shifts.abs().max() == 4 and shifts.min() == -4


def test_cutout_zeroes_a_square():
    x = torch.ones(2, 3, 8, 8)
    out = DSA("cutout").apply(x, AugParams(("cutout",), {"cutout": torch.tensor([[4, 4], [0, 0]])}))
    assert out[0].eq(0).all(0).sum() == 16 and out[0, :, 2:6, 2:6].eq(0).all()
    assert out[1].eq(0).all(0).sum() == 4 and out[1, :, :2, :2].eq(0).all()  # clipped at the corner


def test_neutral_affine_and_color_values_are_identity():
    dsa = DSA(mode="multiple")
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    ones, zeros = torch.ones(2), torch.zeros(2)
    for op, t in {
        "brightness": zeros, "saturation": ones, "contrast": ones, "crop": torch.zeros(2, 2, dtype=torch.long),
        "flip": torch.zeros(2, dtype=torch.bool), "scale": torch.ones(2, 2), "rotate": zeros,
    }.items():
        torch.testing.assert_close(dsa.apply(x, AugParams((op,), {op: t})), x, msg=op)


def test_rotate_quarter_turn():
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    out = DSA("rotate").apply(x, AugParams(("rotate",), {"rotate": torch.tensor([90.0])}))
    # +90 degrees turns the image clockwise as displayed (rows grow downwards); corners stay exact
    torch.testing.assert_close(out, torch.rot90(x, -1, (2, 3)))


def test_color_ranges():
    t = DSA("color").sample(2000, (8, 8), _gen(0)).tensors
    assert -0.5 <= t["brightness"].min() < -0.45 and 0.45 < t["brightness"].max() <= 0.5
    assert 0 <= t["saturation"].min() < 0.05 and 1.95 < t["saturation"].max() <= 2
    assert 0.5 <= t["contrast"].min() < 0.55 and 1.45 < t["contrast"].max() <= 1.5
    s = DSA("scale").sample(2000, (8, 8), _gen(0)).tensors["scale"]
    assert s.shape == (2000, 2) and 0.8 <= s.min() < 0.82 and 1.18 < s.max() <= 1.2
    r = DSA("rotate").sample(2000, (8, 8), _gen(0)).tensors["rotate"]
    assert -15 <= r.min() < -14 and 14 < r.max() <= 15


@pytest.mark.parametrize("strategy", ["none", ""])
def test_identity_strategy(strategy):
    x = torch.randn(2, 3, 8, 8)
    out, params = DSA(strategy)(x, _gen(0))
    assert params.ops == () and torch.equal(out, x)


def test_state_dict_round_trip():
    dsa = DSA(mode="multiple")
    x = torch.randn(3, 3, 8, 8)
    out, params = dsa(x, _gen(7))
    restored = AugParams.from_state_dict(params.state_dict())
    assert restored.ops == params.ops
    assert torch.equal(dsa.apply(x, restored), out)
    moved = params.to("cpu")
    assert torch.equal(dsa.apply(x, moved), out)


def test_bad_settings():
    with pytest.raises(ConfigError, match="'blur'"):
        DSA("color_blur")
    with pytest.raises(ConfigError, match="'both'"):
        DSA(mode="both")
    with pytest.raises(ConfigError, match="repeats"):
        DSA("flip_flip")
    params = DSA("flip").sample(2, (4, 4), _gen(0))
    with pytest.raises(ValueError, match="batch size"):
        DSA("flip").apply(torch.randn(3, 1, 4, 4), params)
    with pytest.raises(ValueError, match="unknown"):
        AugParams.from_state_dict({"ops": ["blur"], "tensors": {"blur": torch.zeros(1)}})
