"""How adapters are stored: one safetensors file each (file), or many of one config in one SQLite pack (pack)."""
