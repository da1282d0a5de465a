"""qgafreeze: quiesce applications around QEMU guest-agent filesystem freezes."""

__version__ = "0.1.0"
