"""Every quantizer of casp.quant.registry, through its spec alone: a linear quantized at the
spec's example setting describes itself, is rebuilt from that description with the same
weight, and stores exactly the bits the setting's cost (the plan's accounting) says."""
import pytest
import torch
from torch import nn

from casp.modules import build_module
from casp.quant.registry import (QUANTIZED_TENSOR_SUFFIXES, QUANTIZERS, described_stored_bits,
                                 quantizer, quantizer_of_setting)

SPECS = list(QUANTIZERS.values())


def _quantized(spec, out_features=32, in_features=64):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    x = torch.randn(256, in_features)
    hessian = x.T @ x / x.shape[0]
    module, _ = spec.quantize_linear(linear, hessian, spec.example_setting)
    return linear, module


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_module_round_trips_through_its_description(spec):
    linear, module = _quantized(spec)
    assert isinstance(module, spec.module_class)
    description = module.describe()
    assert description["type"] == spec.module_class.type_name
    rebuilt = build_module(description)
    assert type(rebuilt) is spec.module_class
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    assert rebuilt.describe() == description
    assert torch.equal(rebuilt.dequantized_weight(), module.dequantized_weight())
    x = torch.randn(3, linear.in_features)
    assert torch.allclose(rebuilt(x), module(x), atol=1e-5)
    # the quantized weight is an approximation of the original, not something else
    err = (module.dequantized_weight() - linear.weight).norm() / linear.weight.norm()
    assert err < 0.9


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_stored_bits_equal_the_setting_cost(spec):
    linear, module = _quantized(spec)
    cost = spec.example_setting.cost(linear.out_features, linear.in_features)
    assert module.storage_bits() == cost
    assert described_stored_bits(module.describe()) == cost
    stored = {k: v for k, v in module.state_dict().items()
              if f".{k}".endswith(QUANTIZED_TENSOR_SUFFIXES)}
    assert set(stored) <= set(spec.module_class.stored_tensors)
    assert sum(v.numel() * v.element_size() * 8 for v in stored.values()) == cost


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_spec_lookups(spec):
    assert quantizer(spec.name) is spec
    assert quantizer_of_setting(spec.example_setting) is spec
    entry = spec.example_setting.plan_entry()
    if spec.coded:
        assert spec.setting_type.from_plan_entry(entry) == spec.example_setting
        widths = dict(item.split("=") for item in spec.default_codebooks.split(","))
        assert all(spec.setting_type.parse(v) for v in widths.values())
    # the flags a quantizer declares are the ones its pass is built from
    names = {flag for flag, _ in spec.flags}
    assert all(name.startswith("--") for name in names)
    assert described_stored_bits({"type": "lowrank"}) is None
