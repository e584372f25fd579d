"""``minild sample``, ``plugins``, ``experiment`` (``edit-digits`` in ``edit_digits``) and ``lab sdxl``."""

from __future__ import annotations

import json

from pathlib import Path

from minild import plugins
from minild.cli.arguments import parse_guidance
from minild.pipeline.grids import grid_conditions, sampling_caption, save_sample_grid


def sample(args) -> int:
    from minild.images import save_labeled_grid
    from minild.pipeline import Pipeline

    if args.prompt is not None and args.class_label is not None:
        raise ValueError("give --prompt or --class-label, not both")
    num = args.num if args.num is not None else 10 if args.prompt is not None else 100
    if num < 1:
        raise ValueError(f"--num must be a positive number of images, got {num}")
    guidance = parse_guidance(args.guidance) if args.guidance is not None else None
    pipe = Pipeline.from_pretrained(args.run_dir)
    sampler = None
    if args.sampler is not None or args.eta is not None:
        sampler = {"name": args.sampler or pipe.config.sampler.name}
        if args.eta is not None:
            sampler["eta"] = args.eta
    if args.prompt is not None:  # one row of num images per prompt
        conditions = {"prompts": [prompt for prompt in args.prompt for _ in range(num)]}
    elif args.class_label is not None:
        conditions = {"class_labels": [args.class_label] * num}
    else:
        conditions = grid_conditions(pipe, num)
    total = len(next(iter(conditions.values()))) if conditions else num
    edit = {}
    if args.image is not None or args.mask is not None or args.strength is not None:
        if args.image is None:
            raise ValueError("--mask and --strength need --image: the image to edit")
        edit = {"image": [args.image[i % len(args.image)] for i in range(total)], "mask": args.mask,
                "strength": args.strength, "jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample}
    images = pipe.generate(
        **conditions, guidance=guidance, guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
        sampler=sampler, seed=args.seed, use_ema=not args.no_ema, **edit,
        **({} if conditions or edit else {"num_images": num}),
    )
    path = Path(args.out or Path(args.run_dir) / "samples.png")
    caption = sampling_caption(pipe, conditions, guidance=guidance, guidance_scale=args.guidance_scale,
                               num_inference_steps=args.steps, sampler=args.sampler)
    title = f"{Path(args.run_dir).name}: " + (f"class {args.class_label} · " if args.class_label is not None else "")
    title += f"{caption} · seed {args.seed}" + (" · raw weights" if args.no_ema and pipe.ema_model is not None else "")
    if args.prompt is not None:
        save_labeled_grid(images.unflatten(0, (len(args.prompt), num)), path, row_labels=args.prompt, title=title)
    else:
        save_sample_grid(pipe, images, path, title=title, conditioned=args.class_label is None)
    print(f"wrote {path}")
    return 0


def list_plugins(args) -> int:
    rows = [("KIND", "NAME", "PLUGIN", "PACKAGE")]
    for kind in plugins.KINDS:
        for name, entry in sorted(plugins.registry(kind).items()):
            rows.append((kind, name, entry.plugin, entry.package or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    for name, reason in sorted(plugins.broken_plugins.items()):
        print(f"broken plugin {name}: {reason}")
    return 0


def experiment(args) -> int:
    from minild.evaluation import experiments
    from minild.conditioning import wants_text
    from minild.evaluation.prompts import run_prompt_frontier
    from minild.evaluation.metrics import load_digit_classifier
    from minild.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.run_dir)
    common = dict(num_inference_steps=args.steps, seed=args.seed, batch_size=args.batch_size)
    text = wants_text(pipe.model)
    # A text model's frontier: methods × scales × phrasings (cfg-digits, or prompt-digits with --scales/--methods).
    frontier = text and (args.experiment == "cfg-digits" or args.scales is not None or args.methods is not None)
    if args.experiment == "cfg-digits" and not text and getattr(pipe.model, "num_classes", None) != 10:
        raise ValueError(f"{args.run_dir} is not a class-conditional digit run (model.num_classes must be 10) nor a "
                         "text-conditioned one; cfg-digits needs one (train configs/digits_class_cfg.yaml)")
    if args.experiment == "prompt-digits" and not text:
        raise ValueError(f"{args.run_dir} is not a text-conditioned run; prompt-digits needs one "
                         "(train configs/digits_text_latent.yaml)")
    out = Path(args.out or Path(args.run_dir) / args.experiment.replace("-", "_"))
    methods = [spec for specs in args.methods for spec in specs] if args.methods else None
    classifier = load_digit_classifier()
    print(f"digit classifier: {classifier.info['test_accuracy']:.1%} accuracy on the held-out test digits")
    if frontier:
        run_prompt_frontier(pipe, methods=methods, guidance_scales=args.scales or (1.0, 2.0, 3.0, 5.0),
                            phrasings=getattr(args, "phrasings", None), per_class=args.per_class, sampler=args.sampler,
                            out_dir=out, classifier=classifier, log=print, **common)
    elif args.experiment == "cfg-digits" and _beside(args) is not None:
        from minild.evaluation.beside import run_cfg_digits_beside

        other = Pipeline.from_pretrained(_beside(args))
        name = "student" if getattr(pipe.model, "takes_guidance_scale", False) else Path(args.run_dir).name
        run_cfg_digits_beside(pipe, other, name=name, other_name=Path(_beside(args)).name, methods=methods,
                              guidance_scales=args.scales, per_class=args.per_class, sampler=args.sampler,
                              out_dir=out, classifier=classifier, log=print, **common)
    elif args.experiment == "cfg-digits":
        experiments.run_cfg_digits(pipe, methods=methods, guidance_scales=args.scales, per_class=args.per_class,
                                   sampler=args.sampler, out_dir=out, classifier=classifier, log=print, **common)
    else:
        prompts = (experiments.load_prompts_file(args.prompts_file) if args.prompts_file
                   else experiments.default_digit_prompts())
        experiments.run_prompt_digits(pipe, prompts, per_prompt=args.per_prompt, guidance_scale=args.guidance_scale,
                                      out_dir=out, classifier=classifier, **{**common, "num_inference_steps": args.steps or 50})
    print((out / ("prompts.md" if args.experiment == "prompt-digits" and not frontier else "results.md")).read_text())
    print(f"wrote {out}")
    return 0


def _beside(args) -> str | None:
    """cfg-digits' --beside RUN, else the teacher a student was distilled from (its distill.json)."""
    if getattr(args, "beside", None) is not None:
        return args.beside
    state = Path(args.run_dir) / "distill.json"
    teacher = json.loads(state.read_text()).get("teacher") if state.is_file() else None
    return teacher if teacher is not None and (Path(teacher) / "config.yaml").is_file() else None


def edit_digits(args) -> int:
    from minild.evaluation.editing import run_edit_digits
    from minild.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.run_dir)
    out = Path(args.out or Path(args.run_dir) / "edit_digits")
    run_edit_digits(pipe, per_class=args.per_class, strengths=args.strengths, regions=args.regions,
                    guidance_scale=args.guidance_scale, num_inference_steps=args.steps, sampler=args.sampler,
                    seed=args.seed, batch_size=args.batch_size, out_dir=out, log=print)
    print((out / "results.md").read_text())
    print(f"wrote {out}")
    return 0


def lab_sdxl(args) -> int:
    from minild.lab.sdxl import read_prompts, run_sdxl_lab

    prompts = args.prompt if args.prompt else read_prompts(args.prompts)
    results = run_sdxl_lab(
        args.model, prompts, negative_prompt=args.negative, guidance_scales=args.guidance,
        num_inference_steps=args.steps, seeds=args.seeds, scheduler=args.scheduler,
        guidance_method=args.guidance_method, size=args.size, out_dir=args.out, device=args.device, dtype=args.dtype,
        memory=args.memory, refiner=args.refiner,
        refiner_start=args.refiner_start, batch_size=args.batch_size, image=args.image, mask=args.mask,
        strength=args.strength, progress=True,
    )
    for note in results.settings["notes"]:
        print(f"note: {note}")
    seconds = sum(image.seconds for image in results.images)
    print(f"generated {len(results.images)} images in {seconds:.1f}s on {results.settings['device']} "
          f"({results.settings['scheduler_class']})")
    print(f"wrote {Path(args.out) / 'index.html'} and {Path(args.out) / 'results.json'}")
    return 0
