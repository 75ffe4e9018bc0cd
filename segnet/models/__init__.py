"""Model architectures, their building blocks and the registry that maps names to builders."""
