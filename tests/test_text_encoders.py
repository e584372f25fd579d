"""Text encoders: a tiny random CLIP saved to disk, and the packaged all-MiniLM-L6-v2; no network."""

from __future__ import annotations

import importlib.util
import pytest
import torch

import minild
from transformers import CLIPTextModel
from minild.config import ConfigError, check_params
from minild_plugins import text_encoders
from minild_plugins.text_encoders import TextEncoderUnavailableError

PROMPTS = ["a handwritten digit seven", "three", ""]


@pytest.fixture
def clip(tiny_clip_dir, offline):
    return minild.create("text_encoder", "clip", pretrained=str(tiny_clip_dir))


@pytest.fixture(scope="module")
def minilm():
    return minild.create("text_encoder", "minilm")


def test_clip_and_minilm_are_registered():
    assert {"clip", "minilm"} <= set(minild.available("text_encoder"))


def test_clip_context_is_batch_by_max_length_by_hidden_size(clip):
    context = clip.encode(PROMPTS)
    assert context.shape == (3, 77, 32)
    assert context.dtype == torch.float32
    assert (clip.embedding_dim, clip.max_length) == (32, 77)


def test_clip_encoding_is_deterministic(tiny_clip_dir, offline):
    first = minild.create("text_encoder", "clip", pretrained=str(tiny_clip_dir)).encode(PROMPTS)
    second = minild.create("text_encoder", "clip", pretrained=str(tiny_clip_dir)).encode(PROMPTS)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_clip_different_prompts_give_different_context(clip):
    seven, three = clip.encode(["seven", "three"])
    assert (seven - three).abs().max() > 1e-3


def test_each_distinct_prompt_is_encoded_once(clip):
    batch_sizes = []
    clip.model.register_forward_hook(
        lambda module, args, kwargs, output: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    first = clip.encode(["seven", "seven", ""])
    again = clip.encode(["", "seven"])
    assert batch_sizes == [1, 1]  # "seven" and "" once each
    torch.testing.assert_close(again, first[[2, 0]], rtol=0, atol=0)
    clip.encode(["three", "seven"])
    assert batch_sizes == [1, 1, 1]  # only the new prompt


def test_context_does_not_depend_on_the_batch(clip, tiny_clip_dir):
    alone = minild.create("text_encoder", "clip", pretrained=str(tiny_clip_dir)).encode(["seven"])
    together = clip.encode(["three", "seven", ""])
    assert torch.equal(together[1:2], alone)


def test_clip_is_frozen(clip):
    context = clip.encode(["seven"])
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert not context.requires_grad


@pytest.mark.parametrize("prompts", ["seven", None, [7], ["seven", None]])
def test_prompts_that_are_not_a_list_of_strings_are_a_value_error(clip, prompts):
    with pytest.raises(ValueError, match="list of prompt strings"):
        clip.encode(prompts)


def test_empty_prompt_list_gives_an_empty_batch(clip):
    assert clip.encode([]).shape == (0, 77, 32)


def test_max_length_beyond_the_models_positions_is_an_error(tiny_clip_dir, offline):
    with pytest.raises(ValueError, match="max_length=78 is longer than the model's 77 positions"):
        minild.create("text_encoder", "clip", pretrained=str(tiny_clip_dir), max_length=78)


def test_missing_directory_offline_is_an_error_naming_it(tmp_path, offline):
    missing = str(tmp_path / "no-such-clip")
    expected = r"cannot load the CLIP text encoder from '.*no-such-clip'.*save_pretrained"
    with pytest.raises(TextEncoderUnavailableError, match=expected):
        minild.create("text_encoder", "clip", pretrained=missing)


def test_unknown_hub_id_offline_is_an_error_naming_it(offline):
    with pytest.raises(TextEncoderUnavailableError, match=r"'nobody/no-such-clip'.*HF_HUB_OFFLINE") as error:
        minild.create("text_encoder", "clip", pretrained="nobody/no-such-clip")
    assert isinstance(error.value, RuntimeError)


def test_directory_without_a_tokenizer_is_an_error(tmp_path, tiny_clip_dir, offline):
    CLIPTextModel.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path)
    with pytest.raises(TextEncoderUnavailableError, match="the directory has no tokenizer"):
        minild.create("text_encoder", "clip", pretrained=str(tmp_path))


def test_constructor_params_pass_the_config_type_check():
    clip_params = {"pretrained": "dir", "max_length": 77, "device": "cpu"}
    check_params(text_encoders.CLIPTextEncoder, clip_params, "c.yaml", "text_encoder")
    check_params(text_encoders.MiniLMTextEncoder, {"pretrained": None, "max_length": 8}, "c.yaml", "text_encoder")
    with pytest.raises(ConfigError, match="text_encoder.max_length must be int"):
        check_params(text_encoders.MiniLMTextEncoder, {"max_length": "8"}, "c.yaml", "text_encoder")


def test_minilm_loads_the_packaged_model(minilm):
    context = minilm.encode(PROMPTS)
    assert context.shape == (3, 16, 384)
    assert context.dtype == torch.float32
    assert minilm.embedding_dim == 384
    assert not any(p.requires_grad for p in minilm.model.parameters())


def test_minilm_prompt_is_closer_to_its_digit_than_to_another(minilm):
    prompts = ["a handwritten digit seven", "seven", "three"]
    context = minilm.encode(prompts)  # [3, L, D]
    mask = minilm.tokenizer(prompts, padding="max_length", truncation=True, max_length=minilm.max_length,
                            return_tensors="pt").attention_mask[..., None]  # [3, L, 1]
    pooled = torch.nn.functional.normalize((context * mask).sum(1) / mask.sum(1), dim=-1)  # [3, D]
    to_seven, to_three = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    assert to_seven > to_three + 0.1  # measured: 0.65 vs 0.29


def test_minilm_without_its_package_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec

    def find_spec_without_minilm(name, *args):
        return None if name == text_encoders.MINILM_PACKAGE else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_minilm)
    with pytest.raises(TextEncoderUnavailableError, match=r'pip install "minild\[text\]"'):
        minild.create("text_encoder", "minilm")
