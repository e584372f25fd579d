"""Argument types and constants shared by the subcommands."""

from __future__ import annotations

import argparse

from minild.config import plain_value

# Classifier-free guidance for class-conditional models, in diffusers' convention:
# 1.0 is the plain conditional model, 3.0 is the paper's w = 2.
GUIDANCE_SCALE = 3.0
GUIDANCE_HELP = "classifier-free guidance for class-conditional models: 1.0 = plain conditional, 0 = unconditional"
RUN_GUIDANCE_HELP = ("guidance scale, diffusers' convention: 1.0 = plain conditional, 0 = unconditional "
                     "(default: the run's guidance stage, plain conditional without one)")


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C


def float_list(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 3,5,7.5; got {text!r}") from None


def int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def str_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def guidance_specs(text: str) -> list[dict]:
    """``cfg,cfg_interval:sigma_low=0.3,sigma_high=2,apg`` → one ``parse_guidance`` spec per method:
    a piece with ``=`` and no ``:`` is one more parameter of the method before it."""
    methods: list[str] = []
    for piece in str_list(text):
        if "=" in piece and ":" not in piece:
            if not methods:
                raise argparse.ArgumentTypeError(f"{piece!r} has no method before it; write NAME:{piece}")
            methods[-1] += ("," if ":" in methods[-1] else ":") + piece
        else:
            methods.append(piece)
    try:
        return [parse_guidance(method) for method in methods]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("--guidance", "--methods")) from None


def parse_guidance(text: str) -> dict:
    """``"cfg_interval:scale=3,sigma_low=0.3"`` → ``{"name": "cfg_interval", "scale": 3, "sigma_low": 0.3}``:
    values that look like integers, numbers, booleans (true/false) or null become them."""
    name, _, params = text.partition(":")
    stage: dict = {"name": name.strip()}
    if not stage["name"]:
        raise ValueError(f"--guidance {text!r}: give a guidance name, e.g. --guidance apg or cfg_interval:scale=3")
    for item in filter(None, (item.strip() for item in params.split(","))):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not key or not equals:
            raise ValueError(f"--guidance {text!r}: {item!r} is not KEY=VALUE; write e.g. {stage['name']}:scale=3")
        stage[key] = plain_value(value)
    return stage
