"""Pipeline: train a few steps, generate, save_pretrained / from_pretrained round trip."""

from __future__ import annotations

import pytest
import torch

import minild
from tests.conftest import tiny_config


def test_train_reduces_nothing_but_runs_and_is_seeded():
    first = minild.Pipeline.from_config(tiny_config())
    second = minild.Pipeline.from_config(tiny_config())
    a = first.train(max_steps=4)
    b = second.train(max_steps=4)
    assert a.steps == 4 and a.reason == "max_steps"
    assert a.losses == b.losses
    assert all(loss > 0 for loss in a.losses)


def test_training_lowers_the_loss():
    pipe = minild.Pipeline.from_config(tiny_config(train={"max_steps": 80, "batch_size": 32, "lr": 3e-3}))
    result = pipe.train()
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.7 * first


def test_generate_returns_images_in_unit_range(tiny_pipeline):
    images = tiny_pipeline.generate(3, num_inference_steps=5, seed=1)
    assert images.shape == (3, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1


def test_generate_is_reproducible_by_seed(tiny_pipeline):
    a = tiny_pipeline.generate(2, num_inference_steps=5, seed=3)
    b = tiny_pipeline.generate(2, num_inference_steps=5, seed=3)
    c = tiny_pipeline.generate(2, num_inference_steps=5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_output_types(tiny_pipeline):
    array = tiny_pipeline.generate(2, num_inference_steps=2, seed=0, output_type="np")
    assert array.shape == (2, 28, 28, 1)
    pil = tiny_pipeline.generate(2, num_inference_steps=2, seed=0, output_type="pil")
    assert len(pil) == 2 and pil[0].size == (28, 28) and pil[0].mode == "L"


def test_generate_with_another_sampler_by_name(tiny_pipeline):
    images = tiny_pipeline.generate(2, num_inference_steps=4, sampler="ddpm", seed=0)
    assert images.shape == (2, 1, 28, 28)


def test_save_and_load_gives_the_same_samples(tmp_path):
    pipe = minild.Pipeline.from_config(tiny_config(train={"hooks": [{"name": "ema", "decay": 0.9}]}))
    pipe.train(max_steps=3)
    pipe.save_pretrained(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.yaml", "model.safetensors", "ema.safetensors"}
    again = minild.Pipeline.from_pretrained(tmp_path / "run")
    for use_ema in (True, False):
        expected = pipe.generate(2, num_inference_steps=5, seed=7, use_ema=use_ema)
        assert torch.equal(again.generate(2, num_inference_steps=5, seed=7, use_ema=use_ema), expected)
    assert again.config == pipe.config


def test_from_pretrained_on_a_plain_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        minild.Pipeline.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    pipe = minild.Pipeline.from_config(tiny_config())
    pipe.save_pretrained(tmp_path)
    bigger = minild.Pipeline.from_config(tiny_config(model={"base_channels": 16}))
    bigger.config.dump(tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="does not fit the configured"):
        minild.Pipeline.from_pretrained(tmp_path)


def test_class_labels_on_an_unconditional_model_are_refused(tiny_pipeline):
    with pytest.raises(ValueError, match="not class-conditional: set model.num_classes"):
        tiny_pipeline.generate(class_labels=[1, 2])


def test_prompts_without_text_encoder_are_refused(tiny_pipeline):
    with pytest.raises(ValueError, match="is not text-conditioned: prompts need a text_encoder stage"):
        tiny_pipeline.generate(prompts=["a seven"])


def test_class_conditional_training_and_guided_generation():
    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}))
    pipe.train(max_steps=2)
    images = pipe.generate(class_labels=[0, 7], guidance_scale=3.0, num_inference_steps=3, seed=0)
    assert images.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\)"):
        pipe.generate(class_labels=[10])


def test_guidance_uses_one_batched_forward_per_step():
    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}))
    calls = []
    pipe.model.register_forward_hook(lambda module, args, kwargs_out=None: calls.append(args[0].shape[0]))
    pipe.generate(class_labels=[1, 2, 3], guidance_scale=2.0, num_inference_steps=4, seed=0)
    assert calls == [6] * 4
    calls.clear()
    pipe.generate(class_labels=[1, 2, 3], guidance_scale=1.0, num_inference_steps=4, seed=0)
    assert calls == [3] * 4


def test_generate_equals_a_diffusers_ddim_loop_with_the_same_seed(tiny_pipeline):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=100, trained_betas=tiny_pipeline.schedule.betas.numpy(), clip_sample=False,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", prediction_type="epsilon",
        thresholding=False, rescale_betas_zero_snr=False,
    )
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((2, 1, 28, 28), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = tiny_pipeline.model(x, t.repeat(2))
            x = scheduler.step(eps, t, x, eta=1.0, generator=generator).prev_sample
    images = tiny_pipeline.generate(2, num_inference_steps=10, sampler={"name": "ddim", "eta": 1.0}, seed=5)
    assert (images - ((x + 1) / 2).clamp(0, 1)).abs().max() < 1e-5


def test_guided_dpm_solver_pp_equals_a_two_pass_diffusers_loop():
    from diffusers import DPMSolverMultistepScheduler

    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}))
    pipe.train(max_steps=2)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=100, trained_betas=pipe.schedule.betas.numpy(), solver_order=2,
        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace",
        final_sigmas_type="zero", prediction_type="epsilon", thresholding=False,
    )
    scheduler.set_timesteps(10)
    labels, null = torch.tensor([3, 8]), torch.tensor([10, 10])
    x = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in scheduler.timesteps:  # the hand-written CFG loop: a conditional and an unconditional pass
            eps_cond = pipe.model(x, t.repeat(2), class_labels=labels)
            eps_uncond = pipe.model(x, t.repeat(2), class_labels=null)
            x = scheduler.step(eps_uncond + 3.0 * (eps_cond - eps_uncond), t, x).prev_sample
    images = pipe.generate(
        class_labels=[3, 8], guidance_scale=3.0, num_inference_steps=10, sampler="dpm_solver_pp", seed=5
    )
    assert (images - ((x + 1) / 2).clamp(0, 1)).abs().max() < 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_pp"])
def test_chunked_generation_equals_one_batch_for_the_same_seed(sampler):
    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}))
    labels = [0, 1, 2, 3, 4, 5, 6]
    kwargs = dict(class_labels=labels, guidance_scale=3.0, num_inference_steps=4, sampler=sampler, seed=11)
    whole = pipe.generate(**kwargs, batch_size=None)
    chunked = pipe.generate(**kwargs, batch_size=3)  # chunks of 3, 3 and 1
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)  # convolutions round per batch size


def test_chunked_stochastic_sampling_with_per_image_generators_equals_one_batch():
    pipe = minild.Pipeline.from_config(tiny_config())
    generators = lambda: [torch.Generator().manual_seed(seed) for seed in range(5)]  # noqa: E731
    kwargs = dict(num_inference_steps=5, sampler="ddpm")
    whole = pipe.generate(5, generator=generators(), batch_size=None, **kwargs)
    chunked = pipe.generate(5, generator=generators(), batch_size=2, **kwargs)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)  # convolutions round per batch size


def test_generate_denoises_at_most_batch_size_images_per_forward():
    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}))
    sizes = []
    pipe.model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    pipe.generate(class_labels=[1] * 5, guidance_scale=2.0, num_inference_steps=2, seed=0, batch_size=2)
    assert sizes == [4, 4, 4, 4, 2, 2]  # cond + uncond halves of chunks of 2, 2 and 1
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
        pipe.generate(2, batch_size=0)


@pytest.fixture
def text_pipeline(tiny_clip_dir, offline):
    config = tiny_config(
        model={"cross_attention_dim": 32, "cross_attention_heads": 2},
        text_encoder={"name": "clip", "pretrained": str(tiny_clip_dir), "max_length": 8},
        data={"prompt_templates": ["a handwritten digit {name}", "{label}"]},
    )
    return minild.Pipeline.from_config(config)


def test_text_conditioned_training_uses_prompt_embeddings_with_dropout(text_pipeline):
    seen = []
    text_pipeline.model.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["context"]), with_kwargs=True)
    text_pipeline.train(max_steps=2, p_uncond=0.5)
    empty = text_pipeline.text_encoder.encode([""])[0]
    rows = torch.cat(seen)  # [2 * B, L, D]
    dropped = [bool(torch.equal(row, empty)) for row in rows]
    assert any(dropped) and not all(dropped)


def test_prompts_generate_and_survive_a_save_load_round_trip(text_pipeline, tmp_path):
    text_pipeline.train(max_steps=2)
    prompts = ["a handwritten digit seven", "3"]
    images = text_pipeline.generate(prompts=prompts, guidance_scale=3.0, num_inference_steps=3, seed=0)
    assert images.shape == (2, 1, 28, 28)
    text_pipeline.save_pretrained(tmp_path)
    again = minild.Pipeline.from_pretrained(tmp_path)
    assert torch.equal(again.generate(prompts=prompts, guidance_scale=3.0, num_inference_steps=3, seed=0), images)


def test_prompt_guidance_batches_cond_and_empty_prompt(text_pipeline):
    contexts = []
    text_pipeline.model.register_forward_hook(lambda module, args, kwargs, out: contexts.append(kwargs["context"]), with_kwargs=True)
    text_pipeline.generate(prompts=["seven"], guidance_scale=2.0, num_inference_steps=1, seed=0)
    (context,) = contexts
    assert context.shape[0] == 2
    assert torch.equal(context[1], text_pipeline.text_encoder.encode([""])[0])


def test_class_labels_on_a_text_only_model_are_refused(text_pipeline):
    with pytest.raises(ValueError, match="not class-conditional"):
        text_pipeline.generate(class_labels=[3])


def test_text_encoder_width_must_match_the_model(tiny_clip_dir, offline):
    config = tiny_config(
        model={"cross_attention_dim": 16}, text_encoder={"name": "clip", "pretrained": str(tiny_clip_dir)}
    )
    with pytest.raises(ValueError, match="gives 32-d embeddings but model.cross_attention_dim is 16"):
        minild.Pipeline.from_config(config)


def test_generated_images_are_ordinary_tensors_and_training_continues_after_generate():
    pipe = minild.Pipeline.from_config(tiny_config())
    images = pipe.generate(2, num_inference_steps=2, seed=0)
    images.mul_(2)  # an inference-mode tensor would refuse this
    assert not images.is_inference()
    assert pipe.train(max_steps=1).steps == 1 and not next(pipe.model.parameters()).is_inference()


def _weights_4d(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def test_generate_runs_the_model_in_channels_last_and_gives_back_its_layout():
    pipe = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}))
    layouts = []
    pipe.model.register_forward_pre_hook(lambda module, args: layouts.append(
        all(p.is_contiguous(memory_format=torch.channels_last) for p in _weights_4d(module))
    ))
    kwargs = dict(class_labels=[1, 7], guidance_scale=3.0, num_inference_steps=3, seed=0, device="cpu")
    fast = pipe.generate(**kwargs)
    assert layouts and all(layouts)
    assert any(not p.is_contiguous(memory_format=torch.channels_last) for p in _weights_4d(pipe.model))
    assert all(p.is_contiguous() for p in pipe.model.parameters())  # as before: save_pretrained needs it
    assert fast.is_contiguous()

    layouts.clear()
    pipe.config.train.channels_last = False
    plain = pipe.generate(**kwargs)
    assert layouts and not any(layouts)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)  # the memory format changes float rounding only


def test_generate_leaves_a_channels_last_model_as_it_was():
    # A trainer hook sampling mid-run: the model being trained keeps its weights' tensors.
    pipe = minild.Pipeline.from_config(tiny_config())
    pipe.model.to(memory_format=torch.channels_last)
    pointers = [p.data_ptr() for p in pipe.model.parameters()]
    pipe.generate(2, num_inference_steps=2, seed=0)
    assert [p.data_ptr() for p in pipe.model.parameters()] == pointers
