"""tokenfabric host agent: bridges the fabric to vLLM and reports load and usage.

Never imports `controller`: the agent installs beside vLLM without the P4Runtime stack.
"""
