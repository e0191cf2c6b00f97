"""`python -m webui_extension install --tgw-dir DIR [--copy]`: the same as `python -m mixtral_offload_plugin.webui`."""

import sys

from mixtral_offload_plugin.webui.install import main

sys.exit(main())
