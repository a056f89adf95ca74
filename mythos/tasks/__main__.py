import sys

from mythos.tasks.build import main

sys.exit(main())
