import sys

from memtune.cli import main

sys.exit(main())
