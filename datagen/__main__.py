"""`python -m datagen ...`: see datagen.cli."""

import sys

from datagen.cli import main

sys.exit(main())
