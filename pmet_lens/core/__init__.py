"""Model plumbing: architecture facts and hook names, model loading, the fast linear path, tokens, read-out,
generation, statistics, presets and file paths."""
