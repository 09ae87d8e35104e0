"""``python -m annotator`` = the ``annotator`` command."""
import sys

from annotator.cli import main

sys.exit(main())
