"""crafttrace: circuit-level refusal research with cross-layer transcoders."""

__version__ = "0.1.0"
