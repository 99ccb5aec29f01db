"""tokenfabric controller: a desired-state reconciler that programs P4 switches."""

import logging

log = logging.getLogger("controller")
