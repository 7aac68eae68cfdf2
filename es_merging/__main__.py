import sys

from es_merging.cli import main

sys.exit(main())
