import sys

from tinylora.cli.main import main

sys.exit(main())
