import sys

from objcache.cli import main

sys.exit(main())
