"""Pipeline.distill: a guided class-conditional run into a few-step student that takes the guidance
scale as an input, saved as a run directory and resumed exactly (tiny models, a 2-step distillation)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import minild
from minild.training import distill as distill_module
from minild.training import distill_targets
from tests.conftest import tiny_class_pipeline, tiny_config, tiny_latent_class_pipeline

QUICK = {"steps": 2, "start_steps": 4, "phase_iterations": 3, "batch_size": 8}  # a guided phase, one halving


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    result = tiny_class_pipeline().distill(out, **QUICK)
    assert result.finished and result.steps == 6 and result.phase == 2
    return out


def count_model_calls(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_student_loads_with_from_pretrained_and_samples_one_model_call_per_step(student_dir):
    student = minild.Pipeline.from_pretrained(student_dir)
    assert student.config.sampler.name == "distilled" and student.config.sampler.params["num_inference_steps"] == 2
    calls = count_model_calls(student.model)
    images = student.generate(class_labels=[0, 1, 2], guidance_scale=3.0, seed=0)
    assert images.shape == (3, 1, 28, 28) and bool(torch.isfinite(images).all())
    assert calls == [3, 3], "one conditional pass of the batch per step, no unconditional one"


def test_the_guidance_scale_is_an_input_of_the_student(student_dir):
    student = minild.Pipeline.from_pretrained(student_dir)
    low = student.generate(class_labels=[4, 5], guidance_scale=1.0, seed=0)
    high = student.generate(class_labels=[4, 5], guidance_scale=4.0, seed=0)
    default = student.generate(class_labels=[4, 5], seed=0)  # the teacher's configured scale
    assert not torch.equal(low, high)
    assert torch.equal(default, student.generate(class_labels=[4, 5], guidance_scale=1.0, seed=0))


def test_the_run_directory_holds_phases_grids_loss_plot_and_checkpoints(student_dir):
    assert (student_dir / "loss.png").is_file() and (student_dir / "distill.json").is_file()
    assert sorted(p.name for p in (student_dir / "samples").iterdir()) == [
        "phase-1-guided-4-steps.png", "phase-2-halve-2-steps.png"]
    phase = minild.Pipeline.from_pretrained(student_dir / "phases" / "steps-2")
    assert phase.sampler.num_inference_steps == 2
    assert list((student_dir / "checkpoints").iterdir())


def test_a_fresh_student_is_the_teachers_conditional_model():
    teacher = tiny_class_pipeline()
    student = minild.Pipeline.from_config(distill_module.student_config(teacher, 4))
    student.model.model.load_state_dict(teacher.model.state_dict())
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([10, 90]), torch.tensor([3, 7])
    with torch.no_grad():
        expected = teacher.model(x, t, class_labels=labels)
        torch.testing.assert_close(student.model(x, t, class_labels=labels, guidance_scale=2.5), expected)


def test_a_resumed_distillation_ends_with_bitwise_the_same_weights(tmp_path):
    whole = tiny_class_pipeline().distill(tmp_path / "whole", **QUICK).student.model.state_dict()
    stopped = tiny_class_pipeline().distill(tmp_path / "parts", **QUICK, max_steps=4)
    assert stopped.reason == "max_steps" and stopped.steps == 4 and stopped.checkpoint is not None
    resumed = tiny_class_pipeline().distill(tmp_path / "parts", **QUICK, resume=True)
    assert resumed.finished and resumed.resumed_from is not None and resumed.steps == 6
    state = resumed.student.model.state_dict()
    assert all(torch.equal(state[name], whole[name]) for name in whole)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    whole = tiny_class_pipeline().distill(tmp_path / "whole", **QUICK).student.model.state_dict()
    train_step = distill_module.Distiller._train_step

    def interrupted_step(self, *args):
        loss = train_step(self, *args)
        if self.step == 1:  # the second step: the signal arrives while it runs
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(distill_module.Distiller, "_train_step", interrupted_step)
    stopped = tiny_class_pipeline().distill(tmp_path / "parts", **QUICK)
    assert stopped.interrupted and stopped.steps == 2 and stopped.checkpoint.name == "step-000002"
    monkeypatch.setattr(distill_module.Distiller, "_train_step", train_step)
    state = tiny_class_pipeline().distill(tmp_path / "parts", **QUICK, resume=True).student.model.state_dict()
    assert all(torch.equal(state[name], whole[name]) for name in whole)


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": 3}, "power of two"),
    ({"steps": 0}, "positive integer"),
    ({"steps": 8, "start_steps": 4}, "at least steps"),
    ({"guidance_scale_range": [4.0, 1.0]}, "low <= high"),
    ({"batch_size": 0}, "positive integer"),
])
def test_bad_options_are_value_errors_naming_them(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        tiny_class_pipeline().distill(tmp_path / "out", **options)


def test_unknown_options_are_refused(tmp_path):
    with pytest.raises(TypeError, match="unknown options"):
        tiny_class_pipeline().distill(tmp_path / "out", iterations=3)


def test_a_teacher_that_is_not_guided_class_conditional_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not class-conditional"):
        minild.Pipeline.from_config(tiny_config()).distill(tmp_path / "a", **QUICK)
    no_dropout = minild.Pipeline.from_config(tiny_config(model={"num_classes": 10}, train={"p_uncond": 0.0}))
    with pytest.raises(ValueError, match="p_uncond"):
        no_dropout.distill(tmp_path / "b", **QUICK)


def test_a_student_cannot_be_distilled_again(student_dir, tmp_path):
    with pytest.raises(ValueError, match="already a distilled student"):
        minild.Pipeline.from_pretrained(student_dir).distill(tmp_path / "again")


def test_an_existing_distillation_is_refused_without_resume(student_dir):
    with pytest.raises(ValueError, match="resume=True"):
        tiny_class_pipeline().distill(student_dir, **QUICK)


def test_the_command_line_distills_samples_and_exits_130_on_ctrl_c(tmp_path, monkeypatch, capsys):
    from minild.cli import main

    teacher = tmp_path / "teacher"
    tiny_class_pipeline().save_pretrained(teacher)
    quick = ["--steps", "2", "--phase-iterations", "2", "--batch-size", "8"]
    train_step = distill_module.Distiller._train_step

    def interrupted_step(self, *args):
        loss = train_step(self, *args)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(distill_module.Distiller, "_train_step", interrupted_step)
    assert main(["distill", str(teacher), "--out", str(tmp_path / "student"), *quick]) == 130
    assert "--resume" in capsys.readouterr().out
    monkeypatch.setattr(distill_module.Distiller, "_train_step", train_step)
    assert main(["distill", str(teacher), "--out", str(tmp_path / "student"), *quick, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "student"), "--num", "10", "--guidance-scale", "3"]) == 0
    assert (tmp_path / "student" / "samples.png").is_file()
    assert main(["distill", str(teacher), "--out", str(teacher)]) == 2


class PointMassEps(torch.nn.Module):
    """The exact eps-model of data that is always the image ``c``: ε(x_t) = (x_t − √ᾱ_t c)/√(1 − ᾱ_t)."""

    def __init__(self, schedule, c):
        super().__init__()
        self.schedule, self.c = schedule, c

    def forward(self, x, t, class_labels=None, guidance_scale=None):
        alpha, sigma = distill_targets.signal_and_noise(self.schedule, t, x)
        return (x - alpha * self.c) / sigma


def test_the_halving_target_of_an_exact_teacher_is_the_data_and_its_loss_zero():
    schedule = minild.create("schedule", "linear", num_timesteps=100)
    c = torch.rand(1, 1, 4, 4) * 2 - 1
    exact = PointMassEps(schedule, c)
    x0, labels = c.expand(6, -1, -1, -1), torch.zeros(6, dtype=torch.long)
    loss = distill_targets.progressive_loss(exact, exact, schedule, 4, x0, labels, (1.0, 4.0),
                                            torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8


def test_the_distilled_chain_is_trailing_and_nests():
    sampler = minild.create("sampler", "distilled", minild.create("schedule", "linear", num_timesteps=1000))
    assert sampler.timesteps(4) == [999, 749, 499, 249]
    for n in (1, 2, 4, 8, 16):
        assert set(sampler.timesteps(n)) <= set(sampler.timesteps(2 * n))


def test_a_distillation_killed_with_sigkill_resumes_from_its_last_checkpoint_exactly(tmp_path):
    import json
    import subprocess
    import sys
    import time

    from minild.training import checkpoint

    config = {**tiny_config(model={"num_classes": 10}, train={"p_uncond": 0.1}), "image_shape": [1, 28, 28]}
    options = {**QUICK, "phase_iterations": 1000, "checkpoint_every_minutes": 0.0}  # a checkpoint every step
    script = "import json, sys, minild; minild.Pipeline.from_config(json.loads(sys.argv[1])).distill(sys.argv[2], **json.loads(sys.argv[3]))"
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", script, json.dumps(config), str(out), json.dumps(options)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while len(checkpoint.list_checkpoints(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        process.kill()  # SIGKILL: no handler runs
        process.wait()
    assert checkpoint.list_checkpoints(out), "no checkpoint was written before the kill"
    resumed = tiny_class_pipeline().distill(out, **options, max_steps=12, resume=True)
    assert resumed.resumed_from is not None and resumed.steps == 12
    whole = tiny_class_pipeline().distill(tmp_path / "whole", **options, max_steps=12)
    state, expected = resumed.student.model.state_dict(), whole.student.model.state_dict()
    assert all(torch.equal(state[name], expected[name]) for name in expected)


def test_a_latent_teacher_distills_into_a_self_contained_latent_student(tmp_path):
    result = tiny_latent_class_pipeline(tmp_path / "vae").distill(tmp_path / "student", **QUICK)
    assert result.finished and (tmp_path / "student" / "vae").is_dir()
    student = minild.Pipeline.from_pretrained(tmp_path / "student")
    assert student.image_shape == (4, 7, 7)
    calls = count_model_calls(student.model)
    assert student.generate(class_labels=[1, 2], guidance_scale=2.0, seed=0).shape == (2, 1, 28, 28)
    assert calls == [2, 2]
