"""The command-line vocabulary of train.py that the config shares, importable without torch (so
that `train.py --help` answers at once): the stages and the original code's flags."""

STAGES = ("teacher", "student")

# The original DualVGR / VQAKD command-line flags and the config keys they set.
ORIGINAL_FLAGS = {
    "alpha": "loss.alpha",
    "beta": "loss.beta",
    "unit_layers": "model.unit_layers",
    "t_app": "loss.tau_app",
    "t_mo": "loss.tau_mo",
    "kd_alpha": "loss.kappa_app",
    "kd_beta": "loss.kappa_mo",
}
