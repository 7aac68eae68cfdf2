import sys

from es_merging.cli import main

# guarded: worker processes started with "spawn" (the zoo build's expert trainers) import the main
# module again, and must not run the command line a second time
if __name__ == "__main__":
    sys.exit(main())
