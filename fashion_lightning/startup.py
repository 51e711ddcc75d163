from fashion_lightning.app import skip_collection_at_exit  # noqa: F401  TEMP
