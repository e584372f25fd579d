"""The SDXL prompt lab (``minild lab sdxl``): diffusers' SDXL pipelines driven by minild's samplers
and guidance stages, its gallery page, and a tiny random SDXL for running it offline. Imports the
core; nothing outside the CLI imports the lab."""
