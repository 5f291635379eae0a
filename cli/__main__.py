import sys

from kairos.cli.main import main

sys.exit(main())
