"""The evaluation wing: the digit classifier and its metrics (accuracy, digit-FID), and the
experiments that measure a trained pipeline (``minild experiment …``). Imports the inference wing
and the core."""
