"""Development tooling: building the local default config's models from PyPI wheels (:mod:`.local_models`,
``make model``) and the LoRA adapter's training set (``adapter_data/``). Nothing that serves a request imports it;
the chart's image never runs it (its models come from a hub or a volume)."""
