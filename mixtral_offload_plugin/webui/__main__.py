"""`python -m mixtral_offload_plugin.webui install --tgw-dir DIR [--copy]`."""

import sys

from .install import main

sys.exit(main())
