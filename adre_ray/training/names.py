"""The training package's vocabulary, importable without torch (the configs and ``--help`` read it)."""

BUILT_IN_LOSSES = ("gaussian", "adre_reg", "smoothadv", "adre_adv")
"""The losses ``adre_ray.training.losses`` registers; its registry (``loss_names()``) is the live list."""
PER_LOSSES = ("mean", "single")
"""ADRE_REG's per-example term: CE averaged over the k draws, or of one random draw (Table 1)."""
SCHEDULES = ("step", "cosine")
"""Learning-rate schedules of ``adre_ray.training.schedules.build_scheduler``."""
