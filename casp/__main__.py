import sys

from casp.cli import main

sys.exit(main())
