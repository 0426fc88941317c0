"""Images in, from shards and folders: decoding, records, the loader. No model, no store."""
