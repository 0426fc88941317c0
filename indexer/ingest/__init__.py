"""`idx build`: sources -> φ -> store, resumable; distributed; watch; npz export."""
