"""Loading models: a local Hugging Face directory (or hub id), or the embedded demo model."""
