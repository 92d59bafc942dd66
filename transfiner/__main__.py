import sys

from transfiner.cli.main import main

sys.exit(main())
