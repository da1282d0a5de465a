"""qgafreeze-host, installed on the hypervisor (``make install-host``): the host side of
qgafreeze.  Standard library only, Python 3.9+, and nothing of the guest's ``qgafreeze`` package,
so that the hypervisor carries none of the guest's parts."""
