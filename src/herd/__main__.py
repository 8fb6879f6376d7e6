import sys

from herd.cli.main import main

sys.exit(main())
