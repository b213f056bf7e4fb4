import sys

from k2_resources.cli import main

sys.exit(main())
