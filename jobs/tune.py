"""``ray job submit --working-dir . -- python jobs/tune.py --space S --config C`` = ``adre-ray tune``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's adre_ray first

from adre_ray.distributed.tune import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
