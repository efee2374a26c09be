"""The node probe (``tmb-probe``): the privileged agent on every GPU node (see DESIGN.md)."""
