"""`python -m tools.caffe_converter`: see cli.py."""
import sys

from tools.caffe_converter.cli import main

sys.exit(main())
