"""alexnetd: the AlexNet (Krizhevsky, Sutskever, Hinton, NIPS 2012) training system as a daemon."""

__version__ = "0.1.0"
