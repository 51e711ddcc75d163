"""The shipped Hydra configs, a package so that Hydra's Compose API finds them by module:
``initialize_config_module("fashion_lightning.conf")`` (or the search path ``pkg://fashion_lightning.conf``)."""
