"""OpenFlow 1.3 southbound (Open vSwitch) through os-ken's message classes (docs/openflow.md).

Imports nothing here: budget.py is used by the controller without os-ken.
"""
