import sys

from mythos.eval.cli import main

sys.exit(main())
