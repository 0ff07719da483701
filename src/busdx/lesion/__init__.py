"""A lesion from a mask: its descriptors (``descriptors``: size, shape, orientation, margin)
and its outline on the scan (``outline``).
"""
