"""The training wing: the training loop and its optimizer step, checkpoints, run directories,
clean stops on signals, several processes, the data stream, and VAE training. Imports only the
core (``minild/*.py``); a trainer is handed its pipeline and never imports the inference wing."""
