"""The cnnlab pyfunc as MLflow's models-from-code: MLflow runs this file to load a logged model (nothing unpickled);
`cnnlab serve` runs it only where it is byte-identical to this installed file (serving/verify.py)."""
import mlflow

from cnnlab.serving.model import CnnlabModel

mlflow.models.set_model(CnnlabModel())
