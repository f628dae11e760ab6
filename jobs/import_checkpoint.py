"""``ray job submit -- python jobs/import_checkpoint.py ...``: the same as ``adre-ray import-checkpoint``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's adre_ray first

from adre_ray.import_cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
