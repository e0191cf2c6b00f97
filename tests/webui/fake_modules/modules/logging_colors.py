"""Stand-in for TextGen's logger."""

import logging

logger = logging.getLogger("textgen")
