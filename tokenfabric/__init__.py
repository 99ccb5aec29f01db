"""tokenfabric: in-network token routing for LLM inference.

This package holds what every role shares: the command line, configuration,
tool discovery, `doctor`, and the beacon wire format that the host agent
sends and the P4 dataplane parses.
"""

__version__ = "0.1.0"
