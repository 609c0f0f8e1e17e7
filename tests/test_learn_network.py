import pytest
import torch

from mrflesion.learn.networks import (
    NetworkSpec,
    UNet,
    count_parameters,
    default_networks,
    forward_padded,
    specs_from_config,
)

# hand count, 35 -> 5 channels: encoder 19,360 + 55,424 + 221,440; bridge 885,248;
# decoder (transposed conv + two 3x3) 573,824 + 143,552 + 35,936; 1x1 head 165
DEFAULT_PARAMS_35_5 = 1_934_949


def test_output_shape_and_parameter_count():
    m = UNet(35, 5)
    assert count_parameters(m) == DEFAULT_PARAMS_35_5
    with torch.no_grad():
        assert m.eval()(torch.zeros(2, 35, 64, 64)).shape == (2, 5, 64, 64)
        assert m(torch.zeros(1, 35, 48, 80)).shape == (1, 5, 48, 80)  # fully convolutional
    small = UNet(2, 1, widths=(4, 8, 16), bridge=32)
    with torch.no_grad():
        y = forward_padded(small.eval(), torch.zeros(1, 2, 37, 45))  # not multiples of 8
    assert y.shape == (1, 1, 37, 45)


def test_architecture_facts():
    m = UNet(35, 5)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 2 * 3 + 2 + 2 * 3
    assert [c.out_channels for c in convs[:8]] == [32, 32, 64, 64, 128, 128, 256, 256]
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 5
    ups = [x for x in m.modules() if isinstance(x, torch.nn.ConvTranspose2d)]
    assert [(u.kernel_size, u.stride, u.out_channels) for u in ups] == [
        ((2, 2), (2, 2), c) for c in (128, 64, 32)
    ]
    assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())


def test_dropout_placement():
    m = UNet(3, 2, widths=(4, 8, 16), bridge=32)
    drops = [x for x in m.modules() if isinstance(x, torch.nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    order: list[str] = []
    names = {id(mod): name for name, mod in m.named_modules()}
    mods = list(m.children()) + list(m.encoders)
    hooks = [mod.register_forward_hook(lambda mod, i, o: order.append(names[id(mod)])) for mod in mods]
    m(torch.zeros(1, 3, 16, 16))
    for h in hooks:
        h.remove()
    # dropout right after the last encoder stage (before its pool) and right after the bridge
    assert order.index("encoder_dropout") == order.index("encoders.2") + 1
    assert order.index("bridge_dropout") == order.index("bridge") + 1
    assert order.count("encoder_dropout") == 1
    # active in training (zeros some activations, scales the rest by 2), identity in eval
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    h = m.bridge_dropout.register_forward_hook(lambda mod, i, o: seen.append((i[0].detach(), o.detach())))
    x = torch.rand(1, 3, 16, 16)
    torch.manual_seed(0)
    m.train()(x)
    m.eval()(x)
    h.remove()
    (i_tr, o_tr), (i_ev, o_ev) = seen
    kept = o_tr != 0
    assert torch.allclose(o_tr[kept], 2 * i_tr[kept]) and (kept != (i_tr != 0)).any()
    assert torch.equal(i_ev, o_ev)


def test_default_networks_table1():
    specs = specs_from_config(default_networks())
    names = ["MSE-5", "MAE-5", "LCL-5", "MSE-1", "MAE-1", "LCL-1", "DICE-1", "MSE-2-1"]
    assert [s.name for s in specs] == names
    by = {s.name: s for s in specs}
    assert by["LCL-5"].outputs == ("T1", "T2star", "NAWM", "GM", "lesion") and by["LCL-5"].uses_mrf
    assert by["DICE-1"].out_activation == "sigmoid" and by["MSE-1"].out_activation == "none"
    assert by["MSE-2-1"].inputs == ("T1", "T2star") and by["MSE-2-1"].outputs == ("lesion",)
    assert by["MSE-2-1"].build(2, (4, 8, 16), 16).in_channels == 2
    d = {"name": "MSE-5", "loss": "mse", "inputs": "mrf", "outputs": ["T1", "T2star", "NAWM", "GM", "lesion"]}
    assert NetworkSpec.from_dict(d).to_dict() == d
    with torch.no_grad():
        y = by["DICE-1"].build(35, (4, 8, 16), 16).eval()(torch.randn(1, 35, 16, 16))
    assert y.min() >= 0 and y.max() <= 1


def test_networks_by_catalogue_name():
    specs = specs_from_config(["MTL-5", {"name": "DICE-1", "epochs": 3}])
    assert [s.name for s in specs] == ["MTL-5", "DICE-1"]
    assert specs[0].loss == "multitask" and specs[0].extra["ema"] == 0.999 and specs[0].extra["dropout"] == 0.0
    assert specs[1].sigmoid_channels == (0,) and specs[1].extra == {"epochs": 3}
    with pytest.raises(ValueError, match=r"networks\[0\]"):
        specs_from_config(["MSE-9"])


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "x", "loss": "huber"},
        {"name": "x", "loss": "mse", "outputs": ["T3"]},
        {"name": "x", "loss": "dice", "outputs": ["T1"]},
        {"name": "x", "loss": "mse", "inputs": ["FLAIR"]},
    ],
)
def test_spec_validation(bad):
    with pytest.raises(ValueError):
        NetworkSpec.from_dict(bad)
