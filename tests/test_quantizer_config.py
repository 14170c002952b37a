"""The onnxruntime quantizer as a library: configured by a plain QuantizerConfig, without a recipe.

torchao's way (export, prepare_pt2e with the quantizer, calibrate, convert_pt2e) with quantcli's
quantizer built from plain values gives the model the recipe's quantization section gives.
"""

from __future__ import annotations

import pytest

from quantcli import _torch, quantizers
from quantcli.errors import RecipeError
from quantcli.quantizers import QuantizerConfig
from quantcli.recipe import QuantizationSection
from tests.models import MODELS, example_batch

torch = _torch.torch


def _int8_outputs(quantizer) -> torch.Tensor:
    """The converted MLP's output on held-out inputs, through torchao's own prepare/convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = MODELS["mlp"][0]()
    calibration = [example_batch("mlp", 16, seed=i) for i in range(3)]
    args = tuple(calibration[0].values())
    program = torch.export.export(model, args, dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch.values())
        return convert_pt2e(prepared)(*example_batch("mlp", 16, seed=100).values())


def test_a_plain_config_quantizes_as_the_recipe_section_does():
    plain = _int8_outputs(quantizers.build(QuantizerConfig(observer="minmax", exclude_names=("fc2",))))
    section = quantizers.resolve(QuantizationSection(observer="minmax", exclude_names=["fc2"]))
    assert torch.equal(plain, _int8_outputs(quantizers.build(section)))
    # the values were read: the default configuration makes another model
    assert not torch.equal(plain, _int8_outputs(quantizers.build(QuantizerConfig())))


def test_build_resolves_the_configs_auto_cpu_settings():
    assert QuantizerConfig(target_cpu="avx2").section().reduce_range == "auto"
    built = quantizers.build(QuantizerConfig(target_cpu="avx2"))  # reduce_range follows the named target
    assert built.q == quantizers.resolve(QuantizationSection(target_cpu="avx2")) and built.q.reduce_range != "auto"
    here = quantizers.build(QuantizerConfig())  # target_cpu auto: this machine's, as prepare resolves it
    assert here.q == quantizers.resolve(QuantizationSection()) and here.q.target_cpu != "auto"


@pytest.mark.parametrize(
    "config, message",
    [
        (QuantizerConfig(observer="mse2"), "QuantizerConfig: observer: unknown observer 'mse2'; did you mean 'mse'?"),
        (
            QuantizerConfig(activations_dtype="int4"),
            "QuantizerConfig: activations.dtype: Input should be 'uint8' or 'int8'",
        ),
        (
            QuantizerConfig(overrides=({"names": ["fc1"], "obsrver": "minmax"},)),
            "QuantizerConfig: overrides.0.obsrver: unknown key; did you mean 'observer'?",
        ),
    ],
)
def test_a_bad_value_is_a_recipe_error_naming_its_key(config, message):
    with pytest.raises(RecipeError) as info:
        quantizers.build(config)
    assert info.value.message.startswith(message), info.value.message
