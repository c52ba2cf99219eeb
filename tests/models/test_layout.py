import copy

import torch

from distill.features import TappedAdapter
from distill.models.adapters import TorchClassifierAdapter
from distill.models.layout import channels_last_for_inference
from distill.models.zoo import MLP, ConvNet


def test_a_conv_teacher_in_channels_last_gives_the_same_outputs_and_taps():
    torch.manual_seed(0)
    plain = ConvNet(width=8).eval()
    fast = copy.deepcopy(plain)
    assert channels_last_for_inference(fast)
    assert fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    tapped = TappedAdapter(TorchClassifierAdapter(fast, "convnet", {"width": 8}), {"layer:features.3": "features.3"})
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        out = tapped({"x": x})
        torch.testing.assert_close(out["logits"], plain(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["layer:features.3"], plain.features[:4](x), rtol=1e-5, atol=1e-6)
    tapped.remove()


def test_a_model_without_convolutions_is_left_alone():
    model = MLP(hidden=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not channels_last_for_inference(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous()
