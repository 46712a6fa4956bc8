import sys

from proto4d.cli import main

sys.exit(main())
