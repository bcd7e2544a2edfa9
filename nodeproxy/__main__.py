import sys

from nodeproxy.cli import main

sys.exit(main())
