"""The served model and what stands in front of it: the pyfunc, request budgets, the guard, the demo page."""
from cnnlab.serving.model import CnnlabModel, InputError, package_copy, pip_requirements, signature

__all__ = ["CnnlabModel", "InputError", "package_copy", "pip_requirements", "signature"]
