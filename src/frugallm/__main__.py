import sys

from frugallm.cli import main

sys.exit(main())
