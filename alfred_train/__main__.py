import sys

from alfred_train.cli import main

sys.exit(main())
