import sys

from pmet_lens.cli import main

sys.exit(main())
