"""``ray job submit --working-dir . -- python jobs/certify.py --config ...`` = ``adre-ray certify``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's adre_ray first

from adre_ray.distributed.certify import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
