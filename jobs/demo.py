"""``python jobs/demo.py`` (or ``ray job submit -- python jobs/demo.py``) = ``adre-ray demo``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's adre_ray first

from adre_ray.demo import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
