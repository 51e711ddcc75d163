from fashion_lightning.app import set_up_process as skip_collection_at_exit  # noqa: F401  TEMP
