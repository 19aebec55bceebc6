"""Built-in policy files (TOML). Shipped inside the wheel as ``safeload.rules``."""
