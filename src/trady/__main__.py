import sys

from trady.cli import main

sys.exit(main())
