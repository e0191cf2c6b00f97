"""Stand-in for `modules.extensions.load_extensions`: user extensions run as fresh non-package modules."""

import importlib.util
import sys

from modules import shared
from modules.logging_colors import logger

setup_called = set()
state = {}


def apply_settings(extension, name):
    for param in getattr(extension, "params", {}):
        key = f"{name}-{param}"
        shared.default_settings[key] = extension.params[param]
        if key in shared.settings:
            extension.params[param] = shared.settings[key]


def load_extensions():
    global state
    state = {}
    for i, name in enumerate(shared.args.extensions):
        path = shared.user_data_dir / "extensions" / name / "script.py"
        if not path.exists():
            continue  # unknown names are skipped silently
        logger.info(f'Loading the extension "{name}"')
        spec = importlib.util.spec_from_file_location(f"user_ext_{name}", str(path))
        extension = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = extension
        spec.loader.exec_module(extension)  # a new module object every time
        if extension not in setup_called:
            apply_settings(extension, name)
            if hasattr(extension, "setup"):
                extension.setup()
            setup_called.add(extension)
        state[name] = [True, i, extension]
