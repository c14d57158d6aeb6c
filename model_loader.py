"""The served model (load, describe, predict a batch); lives in keras_serve/model/served_model.py."""
from keras_serve.model.served_model import Prediction, ServedModel  # noqa: F401
