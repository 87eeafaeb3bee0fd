import sys

from modegpt_rt.cli import main

sys.exit(main())
