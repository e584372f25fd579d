"""The inference wing: ``Pipeline`` (the stages of one model; train, generate, save, load),
``generate``'s argument checks and chunked sampling loop, guidance, and the pipeline's sample grids.
Imports the core and the training wing; nothing here imports the evaluation or lab wings."""

from minild.pipeline.pipeline import Pipeline

__all__ = ["Pipeline"]
