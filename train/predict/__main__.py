"""`python -m train.predict ...` runs train.predict.cli."""
import sys

from train.predict.cli import main

sys.exit(main())
