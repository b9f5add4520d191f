"""The served model and what stands in front of it: the pyfunc, request budgets, the guard, the demo page."""
from cnnlab.serving.model import CnnlabModel, InputError, package_copy, pip_requirements, signature
from cnnlab.serving.verify import MODEL_CODE, UntrustedModel, load_model, verify_model

__all__ = ["MODEL_CODE", "CnnlabModel", "InputError", "UntrustedModel", "load_model", "package_copy",
           "pip_requirements", "signature", "verify_model"]
