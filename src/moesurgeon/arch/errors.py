"""The errors of the architecture adapters: a model, or a config.json, the adapters cannot serve."""


class UnsupportedModelError(ValueError):
    """The model is not a Mixture-of-Experts family this adapter set supports."""


class InvalidConfigError(ValueError):
    """config.json of a supported family holds values no runtime can build a model from."""


class ExpertCountError(ValueError):
    """A standard config.json cannot express a model with the asked-for expert count; the message says why."""
