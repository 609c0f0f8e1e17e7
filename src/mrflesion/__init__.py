"""mrflesion: MS lesion probability mapping from MR fingerprinting."""

__version__ = "0.1.0"
