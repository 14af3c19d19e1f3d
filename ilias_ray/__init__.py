"""ilias-ray: ILIAS feature extraction as an elastic Ray Data job."""

__version__ = "0.1.0"
