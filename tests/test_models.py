"""The built-in eps-models: shapes, gradients, conditioning, errors, config and weight round trips."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from safetensors.torch import load_file, save_file

import minild
from minild.plugins import lookup
from minild_plugins.unets.blocks import SinusoidalEmbedding, crop_to, pad_to_multiple
from tests.conftest import TINY_MODELS

TINY = TINY_MODELS
UNETS = [name for name in TINY if name != "dummy_eps"]
NUM_CLASSES = 3
CONTEXT_DIM = 12
PLAIN_DATA = (int, float, bool, str, list, type(None))


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name, seed=0, **params):
    torch.manual_seed(seed)
    return minild.create("model", name, **{**TINY[name], **params})


def inputs(channels=1, size=(28, 28), batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return x, t


def context(batch=2, length=5, seed=2):
    return torch.randn(batch, length, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed))


def test_every_builtin_model_is_registered():
    assert set(TINY) <= set(minild.available("model"))


@pytest.mark.parametrize("name", TINY)
def test_constructor_takes_annotated_keyword_only_plain_data(name):
    factory = lookup("model", name).factory
    hints = typing.get_type_hints(factory.__init__)
    for parameter in inspect.signature(factory).parameters.values():
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}({parameter.name}) is not keyword-only"
        assert parameter.name in hints, f"{name}({parameter.name}) has no type annotation"
        assert isinstance(parameter.default, PLAIN_DATA), f"{name}({parameter.name}) default is not plain data"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("channels, size", [(1, (28, 28)), (3, (32, 32)), (1, (20, 24))])
def test_output_has_the_input_shape(name, channels, size):
    model = build(name, in_channels=channels)
    x, t = inputs(channels, size)
    assert model(x, t).shape == x.shape


@pytest.mark.parametrize("name", TINY)
def test_output_channels_can_differ_from_input_channels(name):
    model = build(name, in_channels=3, out_channels=2)
    x, t = inputs(3, (32, 32))
    assert model(x, t).shape == (2, 2, 32, 32)


@pytest.mark.parametrize("name", TINY)
def test_channels_last_input_gives_the_same_output(name):
    model = build(name).eval()
    x, t = inputs()
    expected = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    actual = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _conditioning(name):
    """Constructor arguments turning every conditioning path on, and matching forward inputs."""
    if name == "dummy_eps":
        return {}, {}
    params = {
        "num_classes": NUM_CLASSES,
        "cross_attention_dim": CONTEXT_DIM,
        "cross_attention_heads": 2,
        "attention": True,
        "attention_heads": 2,
    }
    return params, {"class_labels": torch.tensor([0, NUM_CLASSES]), "context": context()}


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name):
    params, conditions = _conditioning(name)
    model = build(name, **params)
    x, t = inputs()
    model(x, t, **conditions).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"{name}: no gradient reaches {missing}"


@pytest.mark.parametrize("name", UNETS)
def test_class_labels_change_the_output_and_none_means_the_null_class(name):
    model = build(name, num_classes=NUM_CLASSES).eval()
    x, t = inputs()
    with torch.no_grad():
        first = model(x, t, class_labels=torch.tensor([0, 1]))
        second = model(x, t, class_labels=torch.tensor([2, 2]))
        unconditional = model(x, t)
        null = model(x, t, class_labels=torch.full((2,), NUM_CLASSES))
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, null)
    torch.testing.assert_close(unconditional, null, rtol=0, atol=0)


@pytest.mark.parametrize("name", UNETS)
def test_context_changes_the_output_through_cross_attention(name):
    model = build(name, cross_attention_dim=CONTEXT_DIM, cross_attention_heads=2).eval()
    x, t = inputs()
    with torch.no_grad():
        first = model(x, t, context=context(seed=3))
        second = model(x, t, context=context(seed=4, length=7))
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("name", UNETS)
def test_timestep_changes_the_output(name):
    model = build(name).eval()
    x, t = inputs()
    with torch.no_grad():
        assert not torch.allclose(model(x, t), model(x, t.flip(0) + 1))


@pytest.mark.parametrize("name", TINY)
def test_class_labels_without_num_classes_is_an_error_naming_the_argument(name):
    model = build(name)
    x, t = inputs()
    with pytest.raises(ValueError, match="num_classes" if name != "dummy_eps" else "cannot be conditioned"):
        model(x, t, class_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("name", TINY)
def test_context_without_cross_attention_dim_is_an_error_naming_the_argument(name):
    model = build(name)
    x, t = inputs()
    with pytest.raises(ValueError, match="cross_attention_dim" if name != "dummy_eps" else "cannot be conditioned"):
        model(x, t, context=context())


@pytest.mark.parametrize("name", UNETS)
def test_cross_attention_model_requires_a_context(name):
    model = build(name, cross_attention_dim=CONTEXT_DIM, cross_attention_heads=2)
    x, t = inputs()
    with pytest.raises(ValueError, match="needs context"):
        model(x, t)
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        model(x, t, context=torch.randn(2, 5, CONTEXT_DIM + 1))


@pytest.mark.parametrize("name", UNETS)
@pytest.mark.parametrize("labels", [[0, NUM_CLASSES + 1], [-1, 0]])
def test_class_labels_outside_the_range_are_an_error(name, labels):
    model = build(name, num_classes=NUM_CLASSES)
    x, t = inputs()
    with pytest.raises(ValueError, match=rf"\[0, {NUM_CLASSES}\]"):
        model(x, t, class_labels=torch.tensor(labels))


def test_dummy_eps_cannot_be_built_conditional():
    with pytest.raises(ValueError, match="cannot be class- or text-conditioned"):
        build("dummy_eps", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="cannot be class- or text-conditioned"):
        build("dummy_eps", cross_attention_dim=CONTEXT_DIM)


def test_dummy_eps_ignores_the_timestep():
    model = build("dummy_eps").eval()
    x, t = inputs()
    torch.testing.assert_close(model(x, t), model(x, t.flip(0) + 1), rtol=0, atol=0)


class _NoAttention(torch.nn.Module):
    def forward(self, h, context):
        return h


@pytest.mark.parametrize("pooled", [False, True])
def test_simple_unet_pooled_context_conditions_without_cross_attention(pooled):
    model = build("simple_unet", cross_attention_dim=CONTEXT_DIM, cross_attention_heads=2, pooled_context=pooled).eval()
    model.encoder_attention = model.bottleneck_attention = model.decoder_attention = _NoAttention()
    x, t = inputs()
    with torch.no_grad():
        first = model(x, t, context=context(seed=3))
        second = model(x, t, context=context(seed=4))
    assert torch.allclose(first, second) is not pooled  # only the pooled embedding is left to see the context


def test_simple_unet_pooled_context_needs_cross_attention_dim():
    with pytest.raises(ValueError, match="pooled_context needs a context; set cross_attention_dim"):
        build("simple_unet", pooled_context=True)


def test_simple_unet_rejects_inputs_smaller_than_its_pooling_depth():
    model = build("simple_unet")  # two levels: sides of at least 4
    x, t = inputs(size=(3, 8))
    with pytest.raises(ValueError, match="at least 4"):
        model(x, t)


def test_attention_heads_must_divide_the_channels():
    with pytest.raises(ValueError, match="cross_attention_heads=3"):
        build("film_unet", cross_attention_dim=CONTEXT_DIM, cross_attention_heads=3)


@pytest.mark.parametrize("name", TINY)
def test_safetensors_round_trip_gives_identical_output(name, tmp_path):
    params, conditions = _conditioning(name)
    model = build(name, seed=0, **params)
    x, t = inputs()
    model(x, t, **conditions)  # one training-mode pass moves any BatchNorm running statistics
    save_file(model.state_dict(), tmp_path / "model.safetensors")

    reloaded = build(name, seed=1, **params)
    reloaded.load_state_dict(load_file(tmp_path / "model.safetensors"))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, **conditions), model(x, t, **conditions), rtol=0, atol=0)


@pytest.mark.parametrize("freq_shift", [0, 1])
def test_sinusoidal_embedding_matches_diffusers(freq_shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 250, 999])
    expected = get_timestep_embedding(t, 32, flip_sin_to_cos=False, downscale_freq_shift=freq_shift)
    torch.testing.assert_close(SinusoidalEmbedding(32, freq_shift=freq_shift)(t), expected)


def test_padding_is_centred_and_cropping_undoes_it():
    x = torch.randn(1, 2, 28, 30)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (32, 32)
    assert padded[..., :2, :].abs().sum() == 0 and padded[..., -2:, :].abs().sum() == 0
    torch.testing.assert_close(crop_to(padded, size), x, rtol=0, atol=0)
